# lathe: `make demo` runs the pipeline on the data in testdata/, `make test` runs every test.
CARGO ?= cargo
BIN := target/release
DEMO := demo-out
PYTHON ?= python3

.PHONY: build test demo bench bench-large clean

build:
	$(CARGO) build --release --locked

test:
	$(CARGO) test --release --locked

demo: build
	@mkdir -p $(DEMO)
	@echo "== tokenize: train a byte-level BPE on Tiny Shakespeare"
	$(BIN)/tokenize train testdata/pretrain_tinyshakespeare.parquet --config recipes/tokenizer-demo.toml -o $(DEMO)/tokenizer.json
	$(BIN)/tokenize inspect $(DEMO)/tokenizer.json
	@echo "== tokenize: encode it to token ids"
	$(BIN)/tokenize encode testdata/pretrain_tinyshakespeare.parquet --tokenizer $(DEMO)/tokenizer.json -o $(DEMO)/tokens.parquet
	$(BIN)/tokenize inspect $(DEMO)/tokens.parquet
	@echo "== tokenize: decode back to text"
	$(BIN)/tokenize decode $(DEMO)/tokens.parquet --tokenizer $(DEMO)/tokenizer.json -o $(DEMO)/decoded.parquet

# One JSON object per line per figure.
bench: build
	$(PYTHON) bench/tokenize.py

# Also encode a ~1 GB text to show memory stays bounded (writes ~2 GB under bench-out/).
bench-large: build
	$(PYTHON) bench/tokenize.py --large-mb 1000

clean:
	rm -rf $(DEMO) bench-out
