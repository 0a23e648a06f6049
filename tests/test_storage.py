"""storage: the same behaviour on local paths and on S3 (moto on loopback)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from wsss_ray.core import storage


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty root URI: a local directory or an S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_prefix")


def _all_names(uri: str) -> list[str]:
    """Every entry under ``uri`` as the filesystem itself sees it (hidden files and markers included)."""
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def test_bytes_text_json_roundtrip(base: str) -> None:
    storage.write_bytes(storage.join(base, "a", "b.bin"), b"\x00\x01binary")
    assert storage.read_bytes(storage.join(base, "a/b.bin")) == b"\x00\x01binary"
    storage.write_text(storage.join(base, "t.txt"), "héllo")
    assert storage.read_text(storage.join(base, "t.txt")) == "héllo"
    obj = {"z": 1, "a": [1.5, None, "x"], "m": {"k": True}}
    storage.write_json(storage.join(base, "o.json"), obj)
    assert storage.read_json(storage.join(base, "o.json")) == obj
    # indent 2, sorted keys: stable, diffable files
    assert storage.read_text(storage.join(base, "o.json")).startswith('{\n  "a": [')
    storage.write_bytes(storage.join(base, "a", "b.bin"), b"new")  # overwrite
    assert storage.read_bytes(storage.join(base, "a", "b.bin")) == b"new"


def test_parquet_roundtrip(base: str) -> None:
    table = pa.table({"image_id": ["x", "y"], "n": pa.array([1, 2], pa.int64()), "labels": [[1, 2], []]})
    storage.write_parquet(storage.join(base, "t.parquet"), table)
    assert storage.read_parquet(storage.join(base, "t.parquet")).equals(table)


def test_list_files_recursive_and_suffix(base: str) -> None:
    for rel in ["b/2.png", "a.json", "b/c/3.png", "b/c/4.txt"]:
        storage.write_bytes(storage.join(base, rel), b"x")
    storage.makedirs(storage.join(base, "empty"))
    assert storage.list_files(base) == [storage.join(base, r) for r in ["a.json", "b/2.png", "b/c/3.png",
                                                                        "b/c/4.txt"]]
    assert storage.list_files(storage.join(base, "b"), suffix=".png") == [
        storage.join(base, "b/2.png"), storage.join(base, "b/c/3.png")]
    assert storage.list_files(storage.join(base, "missing")) == []
    # a prefix is a directory, not a string prefix: "b" must not match "bb/..."
    storage.write_bytes(storage.join(base, "bb", "x.png"), b"x")
    assert storage.join(base, "bb/x.png") not in storage.list_files(storage.join(base, "b"))


def test_exists_and_delete(base: str) -> None:
    target = storage.join(base, "d", "f.txt")
    assert not storage.exists(target)
    storage.write_text(target, "x")
    assert storage.exists(target) and storage.exists(storage.join(base, "d"))
    storage.delete(target)
    assert not storage.exists(target)
    storage.delete(target)  # missing: no error
    for rel in ["t/1", "t/u/2"]:
        storage.write_text(storage.join(base, rel), "x")
    storage.delete(storage.join(base, "t"))
    assert storage.list_files(base) == []
    assert not storage.exists(storage.join(base, "t", "u", "2"))


def test_missing_file_error_names_uri(base: str) -> None:
    uri = storage.join(base, "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.png: no such file") as info:
        storage.read_bytes(uri)
    assert uri in str(info.value)


def test_failed_write_leaves_nothing(base: str) -> None:
    # parquet cannot store month-day-nano intervals: serialisation fails after the writer started
    bad = pa.table({"ok": [1], "bad": pa.array([(1, 2, 3)], pa.month_day_nano_interval())})
    target = storage.join(base, "out.parquet")
    with pytest.raises(pa.ArrowException):
        storage.write_parquet(target, bad)
    with pytest.raises(TypeError):
        storage.write_json(storage.join(base, "out.json"), {"x": object()})
    assert not storage.exists(target) and not storage.exists(storage.join(base, "out.json"))
    assert _all_names(base) == []


def test_failed_write_keeps_previous_version(base: str) -> None:
    target = storage.join(base, "keep.parquet")
    good = pa.table({"a": [1, 2]})
    storage.write_parquet(target, good)
    with pytest.raises(pa.ArrowException):
        storage.write_parquet(target, pa.table({"bad": pa.array([(1, 2, 3)], pa.month_day_nano_interval())}))
    assert storage.read_parquet(target).equals(good)
    assert _all_names(base) == ["keep.parquet"]


def test_local_write_failing_midway_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = str(tmp_path / "d" / "f.bin")
    storage.write_bytes(target, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    # the temp file is fully written but the process fails before the rename
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="f.bin"):
        storage.write_bytes(target, b"new")
    monkeypatch.undo()
    assert storage.read_bytes(target) == b"old"
    assert os.listdir(tmp_path / "d") == ["f.bin"]


def test_temp_files_hidden_from_listings(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / f".b.png.tmp-{'0' * 32}").write_bytes(b"partial")  # a concurrent writer's temp file
    assert storage.list_files(str(tmp_path), suffix=".png") == [str(tmp_path / "a.png")]


def test_join_and_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.join("s3://b/p", "x", "y.png") == "s3://b/p/x/y.png"
    assert storage.join("s3://b/p/", "/x/", "", "y") == "s3://b/p/x/y"
    joined = storage.join("/data/voc", "ImageSets/Segmentation", "train.txt")
    assert joined == "/data/voc/ImageSets/Segmentation/train.txt"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3/b") and not storage.is_s3("file:///x")
    assert storage.resolve("s3://bucket/a/b")[1] == "bucket/a/b"
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("rel/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "x")
    assert storage.resolve(f"file://{tmp_path}/y")[1] == str(tmp_path / "y")
    assert storage.local_path_or_none("rel") == str(tmp_path / "rel")
    assert storage.local_path_or_none("s3://b/x") is None
    assert storage.train_storage("rel") == (str(tmp_path / "rel"), None)
    with pytest.raises(ValueError, match="gs://b/x"):
        storage.resolve("gs://b/x")
    # file:// round-trips through list_files in the same form
    storage.write_text(f"file://{tmp_path}/q/z.txt", "z")
    assert storage.list_files(f"file://{tmp_path}/q") == [f"file://{tmp_path}/q/z.txt"]


def test_upload_dir_and_copy_to_local(base: str, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.pt").write_bytes(os.urandom(3000))
    (src / "sub" / "meta.json").write_text('{"epoch": 3}')
    remote = storage.join(base, "checkpoint")
    storage.upload_dir(str(src), remote)
    expected = [storage.join(remote, "model.pt"), storage.join(remote, "sub/meta.json")]
    assert storage.list_files(remote) == expected
    out = storage.copy_to_local(remote, str(tmp_path / "back"))
    assert out == str(tmp_path / "back")
    assert (tmp_path / "back" / "model.pt").read_bytes() == (src / "model.pt").read_bytes()
    assert (tmp_path / "back" / "sub" / "meta.json").read_text() == '{"epoch": 3}'
    single = storage.copy_to_local(storage.join(remote, "sub", "meta.json"), str(tmp_path / "one"))
    assert single == str(tmp_path / "one" / "meta.json") and os.path.isfile(single)
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.copy_to_local(storage.join(base, "missing"), str(tmp_path / "none"))


def test_s3_train_storage_and_cache(s3_prefix: str, s3_server: object) -> None:
    path, fs = storage.train_storage(s3_prefix)
    assert path == s3_prefix.removeprefix("s3://")
    assert isinstance(fs, pafs.S3FileSystem)
    assert storage.resolve(s3_prefix)[0] is fs  # one filesystem per distinct environment
    # Ray ships the filesystem to workers: it must pickle and still work
    clone = pickle.loads(pickle.dumps(fs))
    with clone.open_output_stream(f"{path}/via-clone.txt") as out:
        out.write(b"ok")
    assert storage.read_text(storage.join(s3_prefix, "via-clone.txt")) == "ok"


def test_s3_cache_key_changes_with_env(s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = storage.resolve(s3_prefix)[0]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    assert storage.resolve(s3_prefix)[0] is not first
    monkeypatch.undo()
    assert storage.resolve(s3_prefix)[0] is first


def test_credentials_never_leak(s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "SuperSecretValue1234567890"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "SessionTokenValue0987654321")
    fs, _ = storage.resolve(s3_prefix)
    texts = [repr(fs), str(fs), repr(storage._S3_CACHE)]
    # wrong secret: moto ignores signatures, so provoke errors by a missing object and a missing bucket
    for call in (lambda: storage.read_bytes(storage.join(s3_prefix, "missing")),
                 lambda: storage.read_bytes("s3://no-such-bucket-xyz/k"),
                 lambda: storage.write_bytes("s3://no-such-bucket-xyz/k", b"x")):
        with pytest.raises(OSError) as info:
            call()
        texts.append(str(info.value))
        texts.append(repr(info.value))
        assert "s3://" in str(info.value)  # errors name the URI
    for text in texts:
        assert secret not in text and "SessionTokenValue" not in text


def test_training_rows_keep_their_meaning_in_other_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo's dataset root is relative (data/toy-voc); Ray Train's workers run in other directories and decode
    # the val rows themselves, so the rows a trainer gets name absolute local paths (object-store URIs as they are).
    from wsss_ray.training.ingest import RowSource

    monkeypatch.chdir(tmp_path)
    rows = RowSource([{"image_uri": "data/a.jpg", "mask_uri": None, "label_uri": "s3://bucket/x.png",
                       "image_id": "data/a"}], sample=dict)
    assert rows.records == [{"image_uri": str(tmp_path / "data" / "a.jpg"), "mask_uri": None,
                             "label_uri": "s3://bucket/x.png", "image_id": "data/a"}]
    assert storage.absolute_uri("file:///x/y.png") == "file:///x/y.png"
