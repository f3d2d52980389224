"""The CRC-32 check of torch zip files: a flipped bit is found, an intact or legacy-format file passes."""

import torch

from saq.torchfile import damaged_record
from tests.conftest import flip_tensor_byte


def test_a_flipped_byte_in_a_tensor_is_found_and_named(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    assert damaged_record(path) is None
    record = flip_tensor_byte(path)
    # torch itself loads it without a word: the value is simply wrong
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(1000, dtype=torch.float32))
    assert damaged_record(path) == record
    assert record.endswith("data/0")


def test_files_without_checksums_pass(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert damaged_record(legacy) is None
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    assert damaged_record(garbage) is None  # torch.load's own error names it
