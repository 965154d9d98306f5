"""The safe reader against a hostile-archive corpus generated here, plus legacy CZMODEL packages.

Every hostile case must come back as a specific finding (never an exception), and the zip-bomb cases must
be refused without inflating more than the limit: a counting wrapper around ``ZipExtFile.read`` (the real
reader, only counted) proves how many bytes were inflated.
"""

from __future__ import annotations

import io
import json
import stat
import struct
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest

from czregistry.errors import PackageError
from czregistry.package import (
    ReadLimits,
    inspect_package,
    open_package,
    parse_legacy_xml,
    sha256_file,
    write_package,
)
from czregistry.report import Severity
from tests.static_packages import ONNX_BYTES, czann_meta, legacy_xml

MIB = 1024 * 1024


def checks_of(findings: list[Any], severity: Severity | None = None) -> set[str]:
    return {f.check for f in findings if severity is None or f.severity is severity}


def raw_zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]],
            compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip with exactly these members, whatever they are (duplicates allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names, which is the point
        with zipfile.ZipFile(path, "w", compression) as zf:
            for info, data in members:
                zf.writestr(info, data)
    return path


def good_members(meta: dict[str, Any] | None = None) -> list[tuple[zipfile.ZipInfo | str, bytes]]:
    return [("model.json", json.dumps(meta or czann_meta()).encode()), ("model.model", ONNX_BYTES)]


def patch_central(data: bytes, name: str, *, flags: int | None = None, size: int | None = None) -> bytes:
    """Rewrite fields of ``name``'s central-directory entry (and local header flags): what a hostile tool
    can write but ``zipfile`` refuses to produce."""
    buf = bytearray(data)
    encoded = name.encode()
    pos = buf.find(b"PK\x01\x02")
    while pos != -1:
        n = struct.unpack_from("<H", buf, pos + 28)[0]
        if bytes(buf[pos + 46:pos + 46 + n]) == encoded:
            if flags is not None:
                struct.pack_into("<H", buf, pos + 8, flags)
            if size is not None:
                struct.pack_into("<I", buf, pos + 24, size)
        pos = buf.find(b"PK\x01\x02", pos + 4)
    if flags is not None:
        pos = buf.find(b"PK\x03\x04")
        while pos != -1:
            n = struct.unpack_from("<H", buf, pos + 26)[0]
            if bytes(buf[pos + 30:pos + 30 + n]) == encoded:
                struct.pack_into("<H", buf, pos + 6, flags)
            pos = buf.find(b"PK\x03\x04", pos + 4)
    return bytes(buf)


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the bytes the reader inflates (wraps the real ``ZipExtFile.read``)."""
    counter = [0]
    real_read = zipfile.ZipExtFile.read

    def counting_read(self: zipfile.ZipExtFile, n: int | None = -1) -> bytes:
        data = real_read(self, n)
        counter[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    return counter


# --- valid packages -----------------------------------------------------------------------------------------


def test_valid_czann_reads_cleanly(tmp_path: Path) -> None:
    meta = czann_meta()
    path = write_package(tmp_path / "ok.czann", meta, ONNX_BYTES, license_text="MIT")
    package, findings = inspect_package(path)
    assert findings == []
    assert package is not None and package.ok
    assert package.kind == "czann" and package.metadata == meta
    assert package.model_format == "onnx" and package.license_member == "license.txt"
    assert package.read_model_bytes() == ONNX_BYTES
    with package.model_file() as model_path:
        assert model_path.read_bytes() == ONNX_BYTES
    assert package.read_license() == "MIT"


def test_write_package_is_reproducible(tmp_path: Path) -> None:
    meta = czann_meta()
    a = write_package(tmp_path / "a.czann", meta, ONNX_BYTES)
    b = write_package(tmp_path / "b.czann", meta, ONNX_BYTES)
    assert sha256_file(a) == sha256_file(b)


# --- the hostile corpus -------------------------------------------------------------------------------------


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "x.czann"
    path.write_bytes(b"this is a text file, not a package\n" * 10)
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.not_zip"}


def test_empty_file_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "empty.czann"
    path.write_bytes(b"")
    assert checks_of(inspect_package(path)[1]) == {"archive.not_zip"}


def test_truncated_archive(tmp_path: Path) -> None:
    full = write_package(tmp_path / "full.czann", czann_meta(), ONNX_BYTES * 100).read_bytes()
    path = tmp_path / "cut.czann"
    path.write_bytes(full[: len(full) // 2])
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.truncated"}
    assert "download" in (findings[0].hint or "")


@pytest.mark.parametrize("member", ["model.model", "model.json"])
def test_crc_corruption(tmp_path: Path, member: str) -> None:
    path = raw_zip(tmp_path / "crc.czann", good_members(), compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    start = info.header_offset + 30 + len(member.encode())  # stored data follows the local header
    data[start + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.corrupt"}
    assert "CRC" in findings[0].message


def test_encrypted_member(tmp_path: Path) -> None:
    path = raw_zip(tmp_path / "enc.czann", good_members())
    path.write_bytes(patch_central(path.read_bytes(), "model.model", flags=0x1))
    package, findings = inspect_package(path)
    assert package is None
    assert [(f.check, f.location) for f in findings] == [("archive.encrypted", "model.model")]


def test_duplicate_member_names(tmp_path: Path) -> None:
    path = raw_zip(tmp_path / "dup.czann", [*good_members(), ("model.json", b'{"evil": true}')])
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.duplicate_member"}
    assert findings[0].location == "model.json"


@pytest.mark.parametrize("name", ["/etc/passwd", "../../outside.txt", "sub/../../x", "C:/Windows/x", "..\\up"])
def test_unsafe_member_paths(tmp_path: Path, name: str) -> None:
    info = zipfile.ZipInfo(name)  # ZipInfo keeps the name as given; zipfile's extractor would sanitise it
    path = raw_zip(tmp_path / "path.czann", [*good_members(), (info, b"x")])
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.unsafe_path"}


def test_nul_member_name(tmp_path: Path) -> None:
    path = raw_zip(tmp_path / "nul.czann", [*good_members(), ("evilname", b"x")])
    path.write_bytes(path.read_bytes().replace(b"evilname", b"\x00vilname"))
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.unsafe_path"}
    assert "NUL" in findings[0].message


@pytest.mark.parametrize(("mode", "kind"), [(stat.S_IFLNK | 0o777, "symlink"), (stat.S_IFIFO | 0o644, "special file"),
                                            (stat.S_IFCHR | 0o644, "special file")])
def test_symlink_and_special_members(tmp_path: Path, mode: int, kind: str) -> None:
    info = zipfile.ZipInfo("license.txt")
    info.create_system = 3
    info.external_attr = mode << 16
    path = raw_zip(tmp_path / "link.czann", [*good_members(), (info, b"/etc/passwd")])
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.special_member"}
    assert kind in findings[0].message


@pytest.mark.parametrize(("members", "missing"), [
    ([("model.json", b"{}")], {"model.model"}),
    ([("model.model", ONNX_BYTES)], {"model.json"}),
    ([], {"model.json", "model.model"}),
])
def test_missing_required_members(tmp_path: Path, members: list[Any], missing: set[str]) -> None:
    path = raw_zip(tmp_path / "missing.czann", members)
    package, findings = inspect_package(path)
    assert package is None
    assert checks_of(findings) == {"archive.missing_member"}
    assert {f.location for f in findings} == missing


def test_extra_member_is_a_warning(tmp_path: Path) -> None:
    path = raw_zip(tmp_path / "extra.czann", [*good_members(), ("notes/readme.md", b"hi"), ("LICENSE", b"MIT")])
    package, findings = inspect_package(path)
    assert package is not None and package.ok
    assert [(f.check, f.severity, f.location) for f in findings] == [
        ("archive.extra_member", Severity.WARNING, "notes/readme.md")]
    assert package.license_member == "LICENSE"


def test_metadata_over_1_mib_is_refused_unread(tmp_path: Path, inflated: list[int]) -> None:
    big = json.dumps(czann_meta(ModelName="x" * (MIB + 10))).encode()
    path = raw_zip(tmp_path / "bigmeta.czann", [("model.json", big), ("model.model", ONNX_BYTES)],
                   compression=zipfile.ZIP_STORED)
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.metadata_too_large"}
    assert findings[0].location == "model.json"
    assert inflated[0] == 0


def test_zip_bomb_by_declared_size_is_refused_without_inflating(tmp_path: Path, inflated: list[int]) -> None:
    """The member really holds a few bytes but declares 3 GiB: if the reader inflated it to find out, it
    would hit a CRC/size error (archive.corrupt) instead, and the counter would move."""
    path = raw_zip(tmp_path / "declared.czann", good_members())
    path.write_bytes(patch_central(path.read_bytes(), "model.model", size=3 * 1024 * MIB))
    package, findings = inspect_package(path, ReadLimits(max_member_bytes=1024 * MIB))
    assert package is None
    assert checks_of(findings) == {"archive.zip_bomb"}
    assert "3,221,225,472" in findings[0].message and findings[0].location == "model.model"
    assert inflated[0] == 0


def test_zip_bomb_by_ratio_is_refused_without_inflating(tmp_path: Path, inflated: list[int]) -> None:
    zeros = b"\x00" * (16 * MIB)  # deflates about 1000:1
    path = raw_zip(tmp_path / "ratio.czann", [("model.json", json.dumps(czann_meta()).encode()),
                                              ("model.model", ONNX_BYTES + zeros)])
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.zip_bomb"}
    assert "inflates" in findings[0].message
    assert inflated[0] == 0


def test_total_size_limit(tmp_path: Path) -> None:
    path = raw_zip(tmp_path / "total.czann", [*good_members(), ("license.txt", b"a" * 4000)],
                   compression=zipfile.ZIP_STORED)
    package, findings = inspect_package(path, ReadLimits(max_total_bytes=2000))
    assert package is None and checks_of(findings) == {"archive.zip_bomb"}


def test_member_that_lies_small_is_caught_by_crc(tmp_path: Path, inflated: list[int]) -> None:
    """Declaring fewer bytes than the data holds: zipfile stops at the declared size, so the CRC fails."""
    path = raw_zip(tmp_path / "lie.czann", good_members())
    path.write_bytes(patch_central(path.read_bytes(), "model.model", size=10))
    package, findings = inspect_package(path)
    assert package is None and checks_of(findings) == {"archive.corrupt"}
    assert inflated[0] <= 10 + 8 + len(json.dumps(czann_meta())) + 1


def test_too_many_members(tmp_path: Path) -> None:
    members = [*good_members(), *((f"junk{i}.txt", b"") for i in range(70))]
    package, findings = inspect_package(raw_zip(tmp_path / "many.czann", members))
    assert package is None and "archive.too_many_members" in checks_of(findings)


def test_model_member_of_unknown_format(tmp_path: Path) -> None:
    path = raw_zip(tmp_path / "fmt.czann", [("model.json", json.dumps(czann_meta()).encode()),
                                            ("model.model", b"GIF89a....")])
    package, findings = inspect_package(path)
    assert package is not None and not package.ok
    assert checks_of(findings) == {"archive.model_format"}


@pytest.mark.parametrize(("raw", "check"), [
    (b"{not json", "metadata.json"), (b"[1, 2]", "metadata.json"), (b"\xff\xfe{}", "metadata.encoding"),
    (b"[" * 100_000, "metadata.json"),
])
def test_unparseable_metadata(tmp_path: Path, raw: bytes, check: str) -> None:
    path = raw_zip(tmp_path / "meta.czann", [("model.json", raw), ("model.model", ONNX_BYTES)])
    package, findings = inspect_package(path)
    assert package is not None and package.metadata is None
    assert checks_of(findings) == {check}


def test_open_package_raises_the_first_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.czann"
    path.write_bytes(b"junk")
    with pytest.raises(PackageError, match="not a ZIP archive"):
        open_package(path)


def test_missing_file_raises_package_error(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="cannot read"):
        inspect_package(tmp_path / "nope.czann")


# --- legacy CZMODEL -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["3.0.0", "3.1.0"])
def test_legacy_czmodel_reads(tmp_path: Path, version: str) -> None:
    model_id = str(uuid.uuid4())
    path = write_package(tmp_path / "m.czmodel", legacy_xml(version, model_id), ONNX_BYTES, kind="czmodel")
    package, findings = inspect_package(path)
    assert findings == [] and package is not None
    assert package.kind == "czmodel"
    assert package.metadata_member == f"{model_id}.xml" and package.model_member == f"{model_id}.model"
    assert package.metadata == {
        "Version": version, "Id": model_id, "ModelName": "nuclei", "Status": "Trained",
        "FeatureExtractor": "DeepNeuralNetwork", "Postprocessing": "", "ColorHandling": "ConvertToMonochrome",
        "Channels": [{"PixelType": "Gray8"}],
        "TrainingClasses": [{"Name": "background", "LabelValue": 1, "colR": 37, "colG": 0, "colB": 0},
                            {"Name": "nucleus", "LabelValue": 2, "colR": 74, "colG": 0, "colB": 0}],
        "BorderSize": 16,
    }


def test_legacy_czseg_without_marker_warns(tmp_path: Path) -> None:
    model_id = str(uuid.uuid4())
    path = raw_zip(tmp_path / "m.czseg", [(f"{model_id}.xml", legacy_xml(model_id=model_id)),
                                          (f"{model_id}.model", ONNX_BYTES)])
    package, findings = inspect_package(path)
    assert package is not None and package.ok
    assert checks_of(findings) == {"archive.missing_marker"}


XML_ATTACKS = {
    "billion_laughs": b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
                      b'<Model Version="3.0.0"><Id>&b;</Id></Model>',
    "external_entity": b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                       b'<Model Version="3.0.0"><Id>&x;</Id></Model>',
    "doctype_only": b'<!DOCTYPE Model SYSTEM "http://example.com/m.dtd"><Model Version="3.0.0"/>',
    "utf16_dtd": '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE m [<!ENTITY a "b">]><Model>&a;</Model>'
                 .encode("utf-16"),
}


@pytest.mark.parametrize("name", sorted(XML_ATTACKS))
def test_legacy_xml_dtd_and_entities_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(PackageError, match="DTD or entities"):
        parse_legacy_xml(XML_ATTACKS[name])
    model_id = str(uuid.uuid4())
    path = raw_zip(tmp_path / "x.czmodel", [(f"{model_id}.xml", XML_ATTACKS[name]), (f"{model_id}.model", ONNX_BYTES),
                                            (f"modelid={model_id}", b"")])
    package, findings = inspect_package(path)
    assert package is not None and package.metadata is None
    assert [f.check for f in findings] == ["metadata.xml"]


@pytest.mark.parametrize(("raw", "match"), [(b"<Model", "malformed"), (b"<Other/>", "expected <Model>")])
def test_legacy_xml_malformed(raw: bytes, match: str) -> None:
    with pytest.raises(PackageError, match=match):
        parse_legacy_xml(raw)


def test_zip_directory_round_trip(tmp_path: Path) -> None:
    from czregistry.package import zip_directory

    folder = tmp_path / "saved_model"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"pb")
    (folder / "variables" / "variables.index").write_bytes(b"idx")
    data = zip_directory(folder)
    assert isinstance(data, bytes)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["saved_model.pb", "variables/variables.index"]
    assert zip_directory(folder) == data
