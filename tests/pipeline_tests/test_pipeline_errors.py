"""Bad input gets a clear error naming the value, before any batch is read."""

import gin
import pytest

import pipelines


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(ValueError, match="Unknown task 'pg20_bytes'.*pg19_bytes.*python_stdlib_bytes"):
    pipelines.get_task("pg20_bytes")


def test_unknown_source_short_name():
  with pytest.raises(ValueError, match="Unknown source 'bogus'"):
    pipelines.make_source("bogus")


def test_glob_that_matches_nothing_names_the_pattern(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}/\\*.nothing.*matches no files"):
    pipelines.get_task(f"files_bytes:{tmp_path}/*.nothing")


def test_missing_or_empty_directory_names_it(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    pipelines.get_task(f"tree_bytes:{tmp_path}/absent")
  (tmp_path / "hollow").mkdir()
  with pytest.raises(ValueError, match="hollow.*holds no files"):
    pipelines.get_task(f"tree_bytes:{tmp_path}/hollow")


def test_unknown_tfds_dataset_is_named():
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset_xyz'"):
    pipelines.get_task("tfds:no_such_dataset_xyz:text")


def test_unprepared_tfds_dataset_is_reported_before_reading(tmp_path):
  pipelines.set_default_data_directory(str(tmp_path))
  try:
    with pytest.raises(ValueError, match="'pg19' is not prepared in data directory"):
      pipelines.load_text_dataset("pg19_bytes", "train", sequence_length=64, batch_size=2)
  finally:
    pipelines.tfds_source.set_data_dir(None)


@pytest.mark.parametrize("field, sequence_length, batch_size",
                         [("sequence_length", 0, 2), ("batch_size", 64, -1), ("sequence_length", 1.5, 2)])
def test_non_positive_shapes_are_rejected(field, sequence_length, batch_size):
  with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
    pipelines.load_text_dataset("synthetic", "train", sequence_length=sequence_length,
                                batch_size=batch_size)


def test_unknown_split_is_named():
  with pytest.raises(ValueError, match="Unknown split 'dev'.*train, validation, test"):
    pipelines.load_text_dataset("synthetic", "dev", sequence_length=64, batch_size=2)


def test_more_streams_than_documents_is_an_error_in_training():
  source = pipelines.SyntheticSource(num_documents=3, document_length=100, num_facts=1)
  task = pipelines.Task("synthetic", source, pipelines.RawByteVocabulary())
  with pytest.raises(ValueError, match="3 documents.*fewer than its 4 streams"):
    pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=4)


def test_tokens_task_without_a_model_says_which_binding_to_set():
  with pytest.raises(ValueError, match="pipelines.sentencepiece_vocabulary.model_path"):
    pipelines.get_task("python_stdlib_tokens")


def test_tokens_task_reads_the_model_path_from_gin(sentencepiece_model):
  gin.bind_parameter("pipelines.sentencepiece_vocabulary.model_path", sentencepiece_model)
  assert pipelines.get_task("python_stdlib_tokens").vocabulary.vocab_size == 400


def test_meliad_gin_bindings_parse():
  gin.parse_config("""
      text_dataset.load_text_dataset.verbose = False
      text_dataset.set_default_data_directory.directory_name = None
      text_dataset.get_loss_mask_tokens.splits = ("all",)
      pipelines.synthetic.num_facts = 4
  """)
  assert gin.query_parameter("pipelines.synthetic.num_facts") == 4
