# lathe: `make demo` runs the pipeline on the data in testdata/, `make test` runs every test.
CARGO ?= cargo
BIN := target/release
DEMO := demo-out
PYTHON ?= python3

.PHONY: build test browser demo bench bench-large bench-lora bench-sft profile examples clean

build:
	$(CARGO) build --release --locked

# The browser tests need Debian's chromium; the script installs it once and never fails.
browser:
	@bash scripts/install-browser.sh

test: browser
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
	@echo "== pretrain: a small Llama on the tokens (recipes/tiny.toml: ~2 minutes on 2 cores)"
	rm -rf $(DEMO)/tiny
	$(BIN)/pretrain $(DEMO)/tokens.parquet --tokenizer $(DEMO)/tokenizer.json --config recipes/tiny.toml -o $(DEMO)/tiny
	@cat $(DEMO)/tiny/eval.json
	@echo "   curves: $(DEMO)/tiny/curves.svg"
	@echo "== generate: sample from it"
	$(BIN)/generate testdata/demo_prompts.jsonl --model $(DEMO)/tiny -n 2 --max-new-tokens 60 --temperature 0.8 --top-p 0.95 --show 4 -o $(DEMO)/samples.parquet
	@echo "== sft: instruction-tune it on Alpaca chats (ChatML, answer-only loss, packing)"
	rm -rf $(DEMO)/sft
	$(BIN)/sft testdata/sft_alpaca_messages.parquet --model $(DEMO)/tiny --config recipes/sft-tiny.toml -o $(DEMO)/sft
	$(BIN)/generate testdata/demo_chat_prompts.jsonl --model $(DEMO)/sft -n 1 --max-new-tokens 60 --temperature 0.7 --top-p 0.95 --show 4 -o $(DEMO)/chat_samples.parquet
	@echo "== sft with LoRA: a rank-8 adapter (PEFT's format) on the sft model, gradient checkpointing; inspect, merge, chat"
	rm -rf $(DEMO)/lora $(DEMO)/lora-merged
	$(BIN)/sft testdata/sft_alpaca_messages.parquet --model $(DEMO)/sft --config recipes/sft-tiny.toml --lora-r 8 --gradient-checkpointing --steps 100 --lr 3e-3 -o $(DEMO)/lora
	@grep -E '^  "(eval_loss|parameters|peak_rss_mb)"' $(DEMO)/lora/eval.json
	$(BIN)/adapter inspect $(DEMO)/lora
	$(BIN)/adapter merge $(DEMO)/lora -o $(DEMO)/lora-merged
	$(BIN)/generate testdata/demo_chat_prompts.jsonl --model $(DEMO)/lora -n 1 --max-new-tokens 40 --temperature 0 --show 2 -o $(DEMO)/lora_samples.parquet
	@echo "== rm-train: a reward model on hh-rlhf harmless-base pairs (Bradley-Terry)"
	rm -rf $(DEMO)/rm
	$(BIN)/rm-train testdata/pref_hh_rlhf_harmless_base.parquet --model $(DEMO)/sft --config recipes/rm-tiny.toml -o $(DEMO)/rm
	@grep -E '"(eval_accuracy|eval_margin|reward_mean|reward_std)"' $(DEMO)/rm/eval.json
	@echo "== rm-train: a multi-label guard classifier on OpenAI moderation samples"
	rm -rf $(DEMO)/guard
	$(BIN)/rm-train testdata/moderation_openai_samples.parquet --model $(DEMO)/tiny --config recipes/guard-tiny.toml -o $(DEMO)/guard
	@grep -E '"eval_(macro_f1|macro_auroc|f1/[a-z_]+|auroc/[a-z_]+)"' $(DEMO)/guard/eval.json
	@echo "== the RLHF loop: the sft model answers each prompt 4 times, the reward model scores the answers,"
	@echo "   rank turns them into preference pairs, rm-train refines the reward model on them, ppo tunes the sft model"
	rm -rf $(DEMO)/rl && mkdir -p $(DEMO)/rl
	$(BIN)/generate testdata/demo_rl_prompts.jsonl --model $(DEMO)/sft -n 4 --max-new-tokens 48 --temperature 1.0 -o $(DEMO)/rl/responses.parquet
	$(BIN)/score $(DEMO)/rl/responses.parquet --reward-model $(DEMO)/rm --normalize -o $(DEMO)/rl/scored.parquet
	$(BIN)/rank $(DEMO)/rl/scored.parquet --pairs all --min-margin 0.25 -o $(DEMO)/rl/prefs.parquet
	$(BIN)/rm-train $(DEMO)/rl/prefs.parquet --model $(DEMO)/rm --config recipes/rm-tiny.toml --steps 100 -o $(DEMO)/rl/rm
	$(BIN)/ppo testdata/demo_rl_prompts.jsonl --policy $(DEMO)/sft --reward-model $(DEMO)/rl/rm --val testdata/demo_rl_val_prompts.jsonl --config recipes/ppo-tiny.toml -o $(DEMO)/rl/ppo
	@echo "   curves: $(DEMO)/rl/ppo/curves.svg; every rollout: $(DEMO)/rl/ppo/rollouts/"
	@echo "== dpo beside ppo: the sft model tuned directly on the same rank pairs (recipes/dpo-tiny.toml; reference log-probs computed once)"
	rm -rf $(DEMO)/dpo && mkdir -p $(DEMO)/dpo
	$(BIN)/dpo $(DEMO)/rl/prefs.parquet --model $(DEMO)/sft --config recipes/dpo-tiny.toml -o $(DEMO)/dpo/rank
	@echo "== reward of sampled answers to held-out prompts (the loop's reward model), before and after PPO and DPO"
	@for stage in sft rl/ppo dpo/rank; do \
	  $(BIN)/generate testdata/demo_rl_val_prompts.jsonl --model $(DEMO)/$$stage -n 4 --max-new-tokens 48 --temperature 1.0 -q -o $(DEMO)/rl/heldout.parquet && \
	  $(BIN)/score $(DEMO)/rl/heldout.parquet --reward-model $(DEMO)/rl/rm -o $(DEMO)/rl/heldout_scored.parquet 2>&1 | sed "s|^|   $$stage: |"; \
	done
	@echo "== dpo on the hh-rlhf harmless-base pairs (last 10% held out: eval_rewards/accuracies at step 0 and after)"
	$(BIN)/dpo testdata/pref_hh_rlhf_harmless_base.parquet --model $(DEMO)/sft --config recipes/dpo-tiny.toml -o $(DEMO)/dpo/hh
	@echo "   curves: $(DEMO)/dpo/hh/curves.svg"
	@echo "== the hh-rlhf reward model ($(DEMO)/rm, trained apart) on sampled answers to held-out prompts: sft, then dpo"
	@for stage in sft dpo/hh; do \
	  $(BIN)/generate testdata/demo_rl_val_prompts.jsonl --model $(DEMO)/$$stage -n 4 --max-new-tokens 48 --temperature 1.0 -q -o $(DEMO)/dpo/heldout.parquet && \
	  $(BIN)/score $(DEMO)/dpo/heldout.parquet --reward-model $(DEMO)/rm -o $(DEMO)/dpo/heldout_scored.parquet 2>&1 | sed "s|^|   $$stage: |"; \
	done
	@echo "== redteam: attack the sft model, then the ppo model, with the default suite (recipes/redteam/default.toml);"
	@echo "   refusal, canary, answer and chrF detectors plus the demo guard and reward model; the change per category"
	rm -rf $(DEMO)/redteam && mkdir -p $(DEMO)/redteam
	$(BIN)/redteam --model $(DEMO)/sft --guard $(DEMO)/guard --reward-model $(DEMO)/rl/rm -o $(DEMO)/redteam/sft.parquet --report $(DEMO)/redteam/sft.html \
	  --export-prefs $(DEMO)/redteam/sft_prefs.parquet -q
	$(BIN)/redteam --model $(DEMO)/rl/ppo --guard $(DEMO)/guard --reward-model $(DEMO)/rl/rm -o $(DEMO)/redteam/ppo.parquet --report $(DEMO)/redteam/ppo.html \
	  --baseline $(DEMO)/redteam/sft.parquet --export-prefs $(DEMO)/redteam/prefs.parquet --export-sft $(DEMO)/redteam/safe_sft.parquet
	@echo "   reports: $(DEMO)/redteam/sft.html, $(DEMO)/redteam/ppo.html; training data from the findings: $(DEMO)/redteam/prefs.parquet, safe_sft.parquet"
	@echo "== dpo (with the RPO term: plain DPO only pushes the harmful answers down) on the sft model's red-team findings"
	@echo "   (redteam --export-prefs: the suite's safe answer over each answer that got through), then the same suite again,"
	@echo "   against the sft model's findings: trained on these very attacks, so it shows memorisation as much as safety"
	$(BIN)/dpo $(DEMO)/redteam/sft_prefs.parquet --model $(DEMO)/sft --config recipes/dpo-tiny.toml --rpo-alpha 1 -o $(DEMO)/dpo/redteam
	$(BIN)/redteam --model $(DEMO)/dpo/redteam --guard $(DEMO)/guard --reward-model $(DEMO)/rl/rm -o $(DEMO)/redteam/dpo.parquet --report $(DEMO)/redteam/dpo.html \
	  --baseline $(DEMO)/redteam/sft.parquet
	@echo "== and the price: benign held-out prompts answered with a refusal (greedy; score --rule refusal), sft then dpo on the findings"
	@for stage in sft dpo/redteam; do \
	  $(BIN)/generate testdata/demo_rl_val_prompts.jsonl --model $(DEMO)/$$stage -n 1 --max-new-tokens 48 --temperature 0 -q -o $(DEMO)/dpo/benign.parquet && \
	  $(BIN)/score $(DEMO)/dpo/benign.parquet --rule refusal -o $(DEMO)/dpo/benign_scored.parquet 2>&1 | sed "s|^|   $$stage: |"; \
	done
	$(MAKE) demo-serve
	$(MAKE) demo-annotate

# One JSON object per line per figure.
# Set REFERENCE_PYTHON to a python with torch, transformers and tokenizers (../shared/bench's
# venv) to run the PyTorch / HF references in the same sitting.
REFERENCE_FLAG = $(if $(REFERENCE_PYTHON),--reference-python $(REFERENCE_PYTHON),)
REFERENCE_DIR_FLAG = $(if $(REFERENCE_DIR),--reference-dir $(REFERENCE_DIR),)

# The sitting's matmul peak and memory bandwidth, which bench and profile print.
examples:
	$(CARGO) build --release --locked --example matmul_peak --example memory_bandwidth

bench: build examples
	$(PYTHON) bench/bench_tokenize.py $(REFERENCE_FLAG)
	$(PYTHON) bench/bench_train_generate.py $(REFERENCE_FLAG) $(REFERENCE_DIR_FLAG)
	$(PYTHON) bench/bench_redteam.py
	$(PYTHON) bench/bench_serve_guard.py

# LoRA sft on the Qwen2.5-0.5B shape beside TRL + PEFT (sft_ref.py --lora-r 16): about 25 minutes,
# and REFERENCE_PYTHON must be set (its shapes.py writes the model once under bench-out/).
bench-lora: build
	$(PYTHON) bench/bench_train_generate.py --only sft-lora $(REFERENCE_FLAG) $(REFERENCE_DIR_FLAG)

# Where a training step's time goes (bench-tiny pretrain; the SmolLM2-135M shape's sft with
# REFERENCE_PYTHON), sampled with perf, beside the sitting's matmul peak and memory bandwidth.
profile: build examples
	$(PYTHON) bench/profile.py $(REFERENCE_FLAG)

# Full fine-tuning sft on the SmolLM2-135M shape, without and with checkpointing, beside TRL's
# SFTTrainer (about 8 minutes; REFERENCE_PYTHON writes the shape once under bench-out/).
bench-sft: build
	$(PYTHON) bench/bench_train_generate.py --only sft $(REFERENCE_FLAG) $(REFERENCE_DIR_FLAG)

# Also encode a ~1 GB text to show memory stays bounded (writes ~2 GB under bench-out/).
bench-large: build
	$(PYTHON) bench/bench_tokenize.py --large-mb 1000

clean:
	rm -rf $(DEMO) bench-out

# serve-guard on the demo models (run `make demo` first for demo-out/sft and demo-out/guard):
# the server in the background on a free loopback port, a benign and a harmful request, the queue.
SERVE := $(DEMO)/serve
.PHONY: demo-serve
demo-serve: build
	@echo "== serve-guard: demo-out/sft behind demo-out/guard (input and output), recipes/guard/policy.toml"
	@rm -rf $(SERVE) && mkdir -p $(SERVE)
	@$(BIN)/serve-guard keys add --keys $(SERVE)/keys.txt --name demo -q > $(SERVE)/client.key
	@$(BIN)/serve-guard keys add --keys $(SERVE)/keys.txt --name reviewer --role reviewer -q > $(SERVE)/reviewer.key
	@set -e; \
	$(BIN)/serve-guard serve --model $(DEMO)/sft --input-guard $(DEMO)/guard --output-guard $(DEMO)/guard \
	  --policy recipes/guard/policy.toml --keys $(SERVE)/keys.txt --db $(SERVE)/review.sqlite --listen 127.0.0.1:0 \
	  2> $(SERVE)/server.log & pid=$$!; trap "kill $$pid 2>/dev/null" EXIT; \
	for i in $$(seq 100); do grep -q "listening on" $(SERVE)/server.log && break; kill -0 $$pid || { cat $(SERVE)/server.log; exit 1; }; sleep 0.2; done; \
	url=$$(sed -n "s/.*listening on //p" $(SERVE)/server.log); key=$$(cat $(SERVE)/client.key); \
	echo "   $$url (keys in $(SERVE)/keys.txt; the review page is $$url/review)"; \
	for prompt in "What is the capital of France?" "Describe sex in graphic detail."; do \
	  echo "-- POST /v1/chat/completions: $$prompt"; \
	  curl -sS "$$url/v1/chat/completions" -H "Authorization: Bearer $$key" -H "Content-Type: application/json" \
	    -d "{\"messages\": [{\"role\": \"user\", \"content\": \"$$prompt\"}], \"max_tokens\": 48, \"temperature\": 0.7, \"seed\": 1}"; echo; \
	done; \
	echo "-- the review queue (serve-guard review --db $(SERVE)/review.sqlite to review it)"; \
	$(BIN)/serve-guard review --db $(SERVE)/review.sqlite --list; \
	echo "== redteam the served endpoint (guards on) with the default suite, against the bare sft model's findings"; \
	baseline=$$(test -f $(DEMO)/redteam/sft.parquet && echo "--baseline $(DEMO)/redteam/sft.parquet"); \
	DEMO_KEY=$$key $(BIN)/redteam --endpoint $$url/v1 --api-key-env DEMO_KEY --guard $(DEMO)/guard --reward-model $(DEMO)/rl/rm \
	  $$baseline -o $(DEMO)/redteam/served.parquet --report $(DEMO)/redteam/served.html

# annotate on the demo's RL responses (run `make demo` first for demo-out/rl and demo-out/rm):
# two scripted annotators score a handful through the JSON API (each response seen by both),
# then the export goes through rank into rm-train.
ANNOTATE := $(DEMO)/annotate
.PHONY: demo-annotate
demo-annotate: build
	@echo "== annotate: a web workbench on $(DEMO)/rl/responses.parquet (score 1-7, overlap 2), two scripted annotators"
	@rm -rf $(ANNOTATE) && mkdir -p $(ANNOTATE)
	@$(BIN)/annotate keys add --keys $(ANNOTATE)/keys.txt --name ana -q > $(ANNOTATE)/ana.key
	@$(BIN)/annotate keys add --keys $(ANNOTATE)/keys.txt --name bo -q > $(ANNOTATE)/bo.key
	@$(BIN)/annotate keys add --keys $(ANNOTATE)/keys.txt --name lead --role admin -q > $(ANNOTATE)/lead.key
	@set -e; \
	$(BIN)/annotate serve $(DEMO)/rl/responses.parquet --task score --scale 1-7 --overlap 2 --db $(ANNOTATE)/annotate.sqlite \
	  --keys $(ANNOTATE)/keys.txt --listen 127.0.0.1:0 -q 2> $(ANNOTATE)/server.log & pid=$$!; trap "kill $$pid 2>/dev/null" EXIT; \
	for i in $$(seq 100); do grep -q "listening on" $(ANNOTATE)/server.log && break; kill -0 $$pid || { cat $(ANNOTATE)/server.log; exit 1; }; sleep 0.2; done; \
	url=$$(sed -n "s/.*listening on //p" $(ANNOTATE)/server.log); \
	echo "   $$url (sign in with a key from $(ANNOTATE)/*.key; $$url/admin with lead.key)"; \
	$(PYTHON) scripts/annotate_demo.py $$url $$(cat $(ANNOTATE)/ana.key) $$(cat $(ANNOTATE)/bo.key) --items 24; \
	curl -sS "$$url/api/progress" -H "Authorization: Bearer $$(cat $(ANNOTATE)/lead.key)"; echo
	$(BIN)/annotate stats --db $(ANNOTATE)/annotate.sqlite
	$(BIN)/annotate export --db $(ANNOTATE)/annotate.sqlite --min-annotators 2 -o $(ANNOTATE)/scored.parquet
	$(BIN)/rank $(ANNOTATE)/scored.parquet --pairs all -o $(ANNOTATE)/prefs.parquet
	rm -rf $(ANNOTATE)/rm
	$(BIN)/rm-train $(ANNOTATE)/prefs.parquet --model $(DEMO)/rm --config recipes/rm-tiny.toml --steps 20 -o $(ANNOTATE)/rm
