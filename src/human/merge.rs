//! `score --merge`: the scored files of several annotators become one row per response with
//! the mean score, how many annotators rated it and each one's score, and the annotators'
//! agreement is measured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int32Array, ListArray, RecordBatch, StringArray, StructArray, new_null_array};
use arrow::buffer::OffsetBuffer;
use arrow::compute::interleave;
use arrow::datatypes::{DataType, Field, Fields, Schema};

use super::ItemKey;
use super::agreement::{Agreement, agreement};
use crate::data::parquet_io::{Batch, lathe_metadata};
use crate::data::records::{Record, RecordReader, ResponseRecord};
use crate::data::{ColumnType, Kind, ParquetSink, meta};
use crate::error::{Result, bad_input, usage};
use crate::progress;
use crate::score::carried_fields;

pub struct MergeOptions {
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    /// The score column, read and written.
    pub column: String,
    pub config: String,
}

#[derive(Debug)]
pub struct MergeReport {
    pub responses: usize,
    /// Responses no annotator gave a score.
    pub unrated: usize,
    pub annotators: Vec<String>,
    pub agreement: Agreement,
}

/// One response and every score it was given.
struct Item {
    response: ResponseRecord,
    /// Where its row is: (batch, row in batch), over the batches of all files.
    at: (usize, usize),
    /// (annotator, score) in file order.
    ratings: Vec<(usize, f64)>,
}

/// Every rated response of the inputs, and who rated it.
#[derive(Default)]
struct Collected {
    items: Vec<Item>,
    index: HashMap<ItemKey, usize>,
    annotators: Vec<String>,
    /// (item, annotator) → where that rating was read, to refuse a second one.
    rated: HashMap<(usize, usize), String>,
    batches: Vec<Batch>,
}

pub fn merge(options: &MergeOptions) -> Result<MergeReport> {
    if options.inputs.len() < 2 {
        return Err(usage("--merge needs two or more scored files"));
    }
    crate::output::check_single_stdin(&options.inputs)?;
    let mut collected = Collected::default();
    for path in &options.inputs {
        collected.read(path, &options.column)?;
    }
    if collected.items.is_empty() {
        return Err(bad_input(&options.inputs[0], "no responses in any of the files to merge"));
    }
    let table: Vec<Vec<Option<f64>>> = collected
        .items
        .iter()
        .map(|item| {
            let mut row = vec![None; collected.annotators.len()];
            for &(a, score) in &item.ratings {
                row[a] = Some(score);
            }
            row
        })
        .collect();
    let agreement = agreement(&table, collected.annotators.len());
    collected.write(options, &agreement)?;
    Ok(MergeReport {
        responses: collected.items.len(),
        unrated: collected.items.iter().filter(|i| i.ratings.is_empty()).count(),
        annotators: collected.annotators,
        agreement,
    })
}

/// A response and the scores its annotators gave it, in the order given.
pub struct Rated {
    pub response: ResponseRecord,
    pub ratings: Vec<(String, f64)>,
}

/// Rated responses in `score --merge`'s layout (SPEC scored): the response columns, the mean
/// score in `column` (null when unrated), `scorer` (`mean:NAMES`), `annotators` (how many)
/// and `ratings` (a list of `{annotator, score}`), then the `extra` columns.
pub fn write_merged(output: &Path, stage: &str, column: &str, rows: &[Rated], extra: Vec<(Field, ArrayRef)>, metadata: Vec<(String, String)>) -> Result<()> {
    let rating_fields = Fields::from(vec![Field::new("annotator", DataType::Utf8, false), Field::new("score", DataType::Float64, false)]);
    let ratings_type = DataType::List(Arc::new(Field::new_list_field(DataType::Struct(rating_fields.clone()), false)));
    let mut fields = ResponseRecord::fields();
    fields.push(Field::new(column, DataType::Float64, true));
    fields.push(Field::new("scorer", DataType::Utf8, false));
    fields.push(Field::new("annotators", DataType::Int32, false));
    fields.push(Field::new("ratings", ratings_type, false));

    let responses: Vec<ResponseRecord> = rows.iter().map(|r| r.response.clone()).collect();
    let mut columns = ResponseRecord::to_arrays(&responses);
    let mean = |row: &Rated| (!row.ratings.is_empty()).then(|| row.ratings.iter().map(|r| r.1).sum::<f64>() / row.ratings.len() as f64);
    columns.push(Arc::new(rows.iter().map(mean).collect::<Float64Array>()));
    columns.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|row| {
        let names: Vec<&str> = row.ratings.iter().map(|(a, _)| a.as_str()).collect();
        format!("mean:{}", names.join(","))
    }))));
    columns.push(Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.ratings.len() as i32))));
    let all = || rows.iter().flat_map(|r| r.ratings.iter());
    let values = StructArray::new(
        rating_fields.clone(),
        vec![Arc::new(StringArray::from_iter_values(all().map(|(a, _)| a.as_str()))), Arc::new(Float64Array::from_iter_values(all().map(|&(_, s)| s)))],
        None,
    );
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(|r| r.ratings.len()));
    let list_field = Arc::new(Field::new_list_field(DataType::Struct(rating_fields), false));
    columns.push(Arc::new(ListArray::new(list_field, offsets, Arc::new(values), None)));
    for (field, column) in extra {
        fields.push(field);
        columns.push(column);
    }
    let schema = Arc::new(Schema::new(fields));
    let mut all_metadata = lathe_metadata(Kind::Scored, stage);
    all_metadata.extend(metadata);
    let mut sink = ParquetSink::create(output, schema.clone(), all_metadata)?;
    sink.write(&RecordBatch::try_new(schema, columns)?)?;
    sink.finish()?;
    Ok(())
}

impl Collected {
    fn read(&mut self, path: &Path, column: &str) -> Result<()> {
        let reader = RecordReader::<ResponseRecord>::open(path)?;
        let source = reader.source();
        source.require(column, ColumnType::Float)?;
        let has_annotator = source.optional("annotator", ColumnType::Str)?;
        let has_scorer = source.optional("scorer", ColumnType::Str)?;
        let file_name = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        for item in reader.batches()? {
            let (rows, batch) = item?;
            let scores = batch.optional_f64s(column)?;
            let annotators = if has_annotator { Some(batch.optional_strings("annotator")?) } else { None };
            let scorers = if has_scorer { Some(batch.optional_strings("scorer")?) } else { None };
            for (i, row) in rows.into_iter().enumerate() {
                let place = format!("{} row {}", path.display(), batch.first_row + i as u64);
                let named = |column: &Option<StringArray>| column.as_ref().filter(|c| c.is_valid(i)).map(|c| c.value(i).to_string());
                let item = self.item(row, (self.batches.len(), i), &place)?;
                // A response without a score (skipped, not rated) is merged, but rated by nobody.
                let Some(score) = scores.is_valid(i).then(|| scores.value(i)).filter(|s| s.is_finite()) else { continue };
                let name = named(&annotators).or_else(|| named(&scorers)).unwrap_or_else(|| file_name.clone());
                let annotator = self.annotator(&name);
                if let Some(first) = self.rated.insert((item, annotator), place) {
                    let key = ItemKey::of(&self.items[item].response);
                    return Err(bad_input(path, format!("row {}: {name} rated {key} a second time (first: {first})", batch.first_row + i as u64)));
                }
                self.items[item].ratings.push((annotator, score));
            }
            self.batches.push(batch);
        }
        Ok(())
    }

    fn annotator(&mut self, name: &str) -> usize {
        self.annotators.iter().position(|a| a == name).unwrap_or_else(|| {
            self.annotators.push(name.to_string());
            self.annotators.len() - 1
        })
    }

    /// The item of `row`, added on first sight; a response that changed between files is refused.
    fn item(&mut self, row: ResponseRecord, at: (usize, usize), place: &str) -> Result<usize> {
        let key = ItemKey::of(&row);
        if let Some(&known) = self.index.get(&key) {
            let first = &self.items[known].response;
            if first.prompt != row.prompt || first.response != row.response {
                return Err(usage(format!("{place}: {key} holds another prompt or response than in the first file that has it; merge scores of the same responses")));
            }
            return Ok(known);
        }
        self.index.insert(key, self.items.len());
        self.items.push(Item { response: row, at, ratings: Vec::new() });
        Ok(self.items.len() - 1)
    }

    fn write(&self, options: &MergeOptions, agreement: &Agreement) -> Result<()> {
        let ours = [options.column.as_str(), "scorer", "annotator", "annotators", "ratings"];
        let mut extra = Vec::new();
        for field in carried_fields(&self.batches[0].data.schema(), &ours) {
            match self.carried_column(&field)? {
                Some(column) => extra.push((field.clone().with_nullable(true), column)),
                None => progress::warn(format!("note: column `{}` differs in type between the inputs; it is not carried", field.name())),
            }
        }
        let rows: Vec<Rated> = self
            .items
            .iter()
            .map(|item| Rated { response: item.response.clone(), ratings: item.ratings.iter().map(|&(a, score)| (self.annotators[a].clone(), score)).collect() })
            .collect();
        let metadata = vec![(meta::CONFIG.to_string(), options.config.clone()), ("lathe.agreement".to_string(), serde_json::to_string(agreement)?)];
        write_merged(&options.output, "score", &options.column, &rows, extra, metadata)
    }

    /// An extra column of the first file, taken from whichever file each response came from
    /// (null where that file lacks it); `None` when the files disagree on its type.
    fn carried_column(&self, field: &Field) -> Result<Option<ArrayRef>> {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.batches.len());
        for batch in &self.batches {
            match batch.column(field.name()) {
                Some(array) if array.data_type() == field.data_type() => arrays.push(array.clone()),
                Some(_) => return Ok(None),
                None => arrays.push(new_null_array(field.data_type(), batch.len())),
            }
        }
        let refs: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
        let at: Vec<(usize, usize)> = self.items.iter().map(|i| i.at).collect();
        Ok(Some(interleave(&refs, &at)?))
    }
}
