"""Deferred element patches (TIES' zero-sign rule): recorded chunk by chunk by the outcome each chunk assumed,
applied in memory or to a file for the chunks the model-wide outcome overturns."""

import torch
from safetensors.torch import load_file, save_file

from distmerge.io.writer import patch_safetensors
from distmerge.methods.execute import Deferred, DeferredLog, parse_patch_key, patch_key


def _log(numel: int) -> DeferredLog:
    log = DeferredLog()
    log.add("w", 0, Deferred(3, torch.tensor([1, 4]), torch.tensor([10.0, 40.0])), torch.bfloat16, numel)
    log.add("w", 6, Deferred(-1, torch.tensor([0, 2]), torch.tensor([60.0, 80.0])), torch.bfloat16, numel)
    log.add("w", 12, Deferred(0, torch.tensor([], dtype=torch.int64), torch.tensor([])), torch.bfloat16, numel)
    return log


def test_indices_are_int32_where_they_reach_and_offsets_are_added():
    log = _log(12)
    index, value = log.joined(1)["w"]
    assert index.dtype == torch.int32 and index.tolist() == [1, 4, 6, 8]
    assert value.dtype == torch.bfloat16 and value.tolist() == [10.0, 40.0, 60.0, 80.0]
    assert log.vote == 2 and log.count == 4 and log.counts == {1: 4}
    assert _log(2**31).joined(1)["w"][0].dtype == torch.int32  # its last index is 2**31 - 1
    assert _log(2**31 + 1).joined(1)["w"][0].dtype == torch.int64  # a tensor int32 cannot index


def test_patches_apply_in_memory_and_to_a_file(tmp_path):
    log = _log(12)
    weights = torch.zeros(3, 4, dtype=torch.bfloat16)
    other = torch.ones(5, dtype=torch.bfloat16)
    path = tmp_path / "model.safetensors"
    save_file({"other": other, "w": weights}, str(path))
    want = torch.zeros(12, dtype=torch.bfloat16)
    want[[1, 4, 6, 8]] = torch.tensor([10.0, 40.0, 60.0, 80.0], dtype=torch.bfloat16)

    outputs = {"w": weights.clone()}
    assert log.apply(outputs, 1) == 0 and log.apply(outputs, None) == 0  # merged as decided: nothing to rewrite
    assert torch.equal(outputs["w"], weights)
    assert log.apply(outputs, -1) == 4
    assert torch.equal(outputs["w"].reshape(-1), want)

    assert patch_safetensors(path, log.joined(1)) == 4
    stored = load_file(str(path))
    assert torch.equal(stored["w"].reshape(-1), want)
    assert torch.equal(stored["other"], other)  # the neighbouring tensor untouched


def test_chunks_that_assumed_the_outcome_stay_and_the_others_are_rewritten():
    log = DeferredLog(prior=-5)
    log.add("w", 0, Deferred(-2, torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), assumed=1), torch.float32, 8)
    log.add("w", 4, Deferred(-1, torch.tensor([2]), torch.tensor([3.0]), assumed=-1), torch.float32, 8)
    assert log.counts == {1: 2, -1: 1} and log.count == 3 and log.vote == -3
    follow = log.next()
    assert follow.prior == -8 and follow.vote == 0 and follow.count == 0  # the next shard leans as this one ended

    for outcome, want in ((-1, [1.0, 2.0, 0, 0, 0, 0, 0, 0]), (1, [0, 0, 0, 0, 0, 0, 3.0, 0])):
        outputs = {"w": torch.zeros(8)}
        assert log.apply(outputs, outcome) == (2 if outcome == -1 else 1)
        assert outputs["w"].tolist() == want


def test_patch_file_keys_keep_the_earlier_form_for_outcome_one():
    assert patch_key("a::b.weight", "index", 1) == "a::b.weight::index"  # what files held before chunks leaned
    assert patch_key("a.weight", "value", -1) == "a.weight::value@-1"
    for tensor in ("a.weight", "x::y"):
        for part in ("index", "value"):
            for assumed in (1, -1):
                assert parse_patch_key(patch_key(tensor, part, assumed)) == (tensor, part, assumed)


def _shard_file(tmp_path):
    path = tmp_path / "model-00001-of-00001.safetensors"
    save_file({"w": torch.zeros(8)}, str(path))
    return path


def test_a_written_shard_is_patched_where_its_chunks_assumed_another_outcome(tmp_path):
    from distmerge.engine.driver import _WrittenShard

    _shard_file(tmp_path)
    log = DeferredLog()
    log.add("w", 0, Deferred(-2, torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), assumed=1), torch.float32, 8)
    log.add("w", 4, Deferred(-1, torch.tensor([2]), torch.tensor([3.0]), assumed=-1), torch.float32, 8)
    (tmp_path / ".patches").mkdir()
    stored = {}
    for assumed in log.patches:
        for name, (index, value) in log.joined(assumed).items():
            stored[patch_key(name, "index", assumed)], stored[patch_key(name, "value", assumed)] = index, value
    save_file(stored, str(tmp_path / ".patches" / "model-00001-of-00001.safetensors"))
    result = {"filename": "model-00001-of-00001.safetensors", "patches": ".patches/model-00001-of-00001.safetensors",
              "deferred_counts": {str(a): n for a, n in log.counts.items()}}
    shard = _WrittenShard(tmp_path, result)
    assert shard.patch({}, -1) == 3
    assert load_file(str(tmp_path / result["filename"]))["w"].tolist() == [1.0, 2.0, 0, 0, 0, 0, 0, 0]
    assert shard.patch({}, 1) == 3
    assert load_file(str(tmp_path / result["filename"]))["w"].tolist() == [1.0, 2.0, 0, 0, 0, 0, 3.0, 0]


def test_a_shard_recorded_before_chunks_leaned_is_still_patched(tmp_path):
    """A resumed run whose shards were written by an earlier distmerge: its patch files hold only elements
    merged as +1 and its record no counts."""
    from distmerge.engine.driver import _WrittenShard

    _shard_file(tmp_path)
    (tmp_path / ".patches").mkdir()
    save_file({"w::index": torch.tensor([3, 5], dtype=torch.int32), "w::value": torch.tensor([7.0, 9.0])},
              str(tmp_path / ".patches" / "model-00001-of-00001.safetensors"))
    result = {"filename": "model-00001-of-00001.safetensors", "patches": ".patches/model-00001-of-00001.safetensors"}
    assert _WrittenShard(tmp_path, result).patch({}, 1) == 2
    assert load_file(str(tmp_path / result["filename"]))["w"].tolist() == [0.0] * 8
    assert _WrittenShard(tmp_path, result).patch({}, -1) == 2
    assert load_file(str(tmp_path / result["filename"]))["w"].tolist() == [0, 0, 0, 7.0, 0, 9.0, 0, 0]
