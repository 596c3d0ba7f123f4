"""The expert-counts file format: round trip, and one clear error per problem."""

import json

import numpy as np
import pytest

from moe_jax import expert_counts

COUNTS = {"encoder": np.array([[120, 3, 40, 0], [15, 80, 22, 31]]),
          "decoder": np.array([[0.5, 2.25, 7, 1e6]])}


def _write(tmp_path, **changes):
  document = {"format": "moe_jax.expert_counts", "version": 1, "num_experts": 4,
              "stacks": {"encoder": [[1, 2, 3, 4], [5, 6, 7, 8]]}, "tokens": 9, "source": "x"}
  document.update(changes)
  path = tmp_path / "counts.json"
  path.write_text(json.dumps(document))
  return path


def test_round_trip(tmp_path):
  path = tmp_path / "counts.json"
  expert_counts.save(path, COUNTS, tokens=128, source="a test")
  loaded = expert_counts.load(path, layer_counts={"encoder": 2, "decoder": 1}, num_experts=4)
  assert set(loaded) == set(COUNTS)
  for stack, counts in COUNTS.items():
    assert loaded[stack].dtype == np.float32
    np.testing.assert_array_equal(loaded[stack], counts.astype(np.float32))
  document = json.loads(path.read_text())
  assert document["format"] == "moe_jax.expert_counts" and document["version"] == 1
  assert document["num_experts"] == 4 and document["tokens"] == 128
  assert document["source"] == "a test"
  assert document["stacks"]["encoder"][0] == [120, 3, 40, 0]        # whole counts as ints
  assert expert_counts.load(path)["decoder"].shape == (1, 4)        # no model to check against


@pytest.mark.parametrize("changes,kwargs,match", [
    (dict(format="something.else"), {}, "format is 'something.else', expected"),
    (dict(version=2), {}, "version 2 is not supported"),
    ({}, dict(num_experts=8), "counts are for num_experts=4, but the model has 8"),
    ({}, dict(layer_counts={"encoder": 2, "decoder": 2}), r"has stacks \['encoder'\], the model"),
    ({}, dict(layer_counts={"encoder": 3}), "'encoder' has 2 layers of counts, the model has 3"),
    (dict(stacks={"encoder": [[1, 2, 3, 4], [5, 6, 7]]}), {}, "layer 1 has 3 counts.*ragged"),
    (dict(stacks={"encoder": [[1, 2, -3, 4]]}), {}, "layer 0 expert 2 has count -3.0"),
    (dict(stacks={"encoder": [[1, float("nan"), 3, 4]]}), {}, "expert 1 has count nan"),
    (dict(stacks={"encoder": [[1, "2", 3, 4]]}), {}, "holds a non-number"),
    (dict(stacks={"encoder": [1, 2, 3, 4]}), {}, "must be a list of rows"),
    (dict(stacks={}), {}, "stacks must be a non-empty object"),
    (dict(num_experts=0), {}, "num_experts must be a positive int"),
    (dict(tokens=-1), {}, "tokens must be an int >= 0 or null"),
])
def test_load_errors(tmp_path, changes, kwargs, match):
  path = _write(tmp_path, **changes)
  with pytest.raises(ValueError, match=match) as error:
    expert_counts.load(path, **kwargs)
  message = str(error.value)
  assert message.startswith(str(path)) and "\n" not in message


def test_not_json(tmp_path):
  path = tmp_path / "counts.json"
  path.write_text("encoder: 1 2 3")
  with pytest.raises(ValueError, match="not a JSON file"):
    expert_counts.load(path)


@pytest.mark.parametrize("counts,kwargs,match", [
    ({"encoder": [[1, 2], [3]]}, {}, "ragged rows"),
    ({"encoder": [[1, -2]]}, {}, "expert 1 has count -2.0"),
    ({"encoder": [[1, np.inf]]}, {}, "expert 1 has count inf"),
    ({"encoder": [1, 2]}, {}, r"has shape \(2,\), expected \[n, E\]"),
    ({"encoder": [[1, 2]], "decoder": [[1, 2, 3]]}, {}, "different numbers of experts"),
    ({"encoder": [[1, 2]]}, dict(tokens=-5), "tokens must be an int >= 0 or None"),
    ({}, {}, "counts must be a non-empty dict"),
])
def test_save_errors(tmp_path, counts, kwargs, match):
  path = tmp_path / "counts.json"
  with pytest.raises(ValueError, match=match):
    expert_counts.save(path, counts, **kwargs)
  assert not path.exists()
