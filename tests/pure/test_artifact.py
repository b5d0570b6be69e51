# SPDX-License-Identifier: GPL-3.0-or-later
"""Saved artifacts detect their own corruption (samplers/artifact.py, samplers/code_format.py), in-process."""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch


@pytest.fixture(scope="module")
def A(pack):
    return pack.samplers.artifact


@pytest.fixture(scope="module")
def F(pack):
    return pack.samplers.code_format


SIGMAS = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64)


def small_code(S, **extra):
    code = S.prior_code((1, 4, 2, 2), SIGMAS, 0.2, "flow", seed=5)
    g = torch.Generator().manual_seed(9)
    code.start_mean = torch.randn(code.shape, generator=g)
    code.residual = torch.randn(code.shape, generator=g)
    for k, v in extra.items():
        setattr(code, k, v)
    return code


def write_v1_code(path, code, F):
    """A version-1 file exactly as the pack wrote it before digests: safetensors' own writer, no digest,
    no latent format."""
    from safetensors.torch import save_file

    meta = {"format": F.FORMAT_NAME, "format_version": "1", "family": code.family, "eta": repr(float(code.eta)),
            "start_scale": repr(float(code.start_scale)), "shape": json.dumps(list(code.shape)),
            "steps": str(code.steps), "sigmas": json.dumps([float(s) for s in code.sigmas])}
    tensors = {"sigmas": code.sigmas.double().contiguous(), "start_mean": code.start_mean.float().contiguous(),
               "start_noise": code.start_noise.float().contiguous(), "noises": code.noises.float().contiguous(),
               "residual": code.residual.float().contiguous()}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_round_trip_is_bit_exact_and_plain_safetensors(pack, A, tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).double(),
               "c": torch.arange(5, dtype=torch.int8), "d": torch.randn(2, 3, generator=g).half(),
               "e": torch.zeros(0, 4)}
    meta = {"format": "test-thing", "note": "héllo \"quoted\""}
    path = A.save_artifact(tmp_path / "t.safetensors", tensors, meta)
    back, bmeta = A.load_artifact(path, "test-thing")
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert bmeta["note"] == meta["note"] and bmeta["format"] == "test-thing"
    assert bmeta["sha256"].startswith("sha256:") and len(bmeta["sha256"]) == 7 + 64
    # any safetensors reader opens it
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("b"), tensors["b"])
        assert f.metadata()["note"] == meta["note"]
    with pytest.raises(A.ArtifactError, match="not a direction"):
        A.load_artifact(path, "other-format", what="direction")
    with pytest.raises(A.ArtifactError, match="reserved"):
        A.save_artifact(tmp_path / "x.safetensors", tensors, {"sha256": "mine"})


def test_every_byte_flip_is_refused(pack, A, F, tmp_path):
    """Each byte of a saved code, flipped (one seeded random non-zero XOR per byte, plus the flips that keep
    JSON valid: a padding or separator space turned into tab/newline/CR), must be refused."""
    code = small_code(pack.samplers, latent_format="SD3", latent_scale_factor=1.5305, model_type="SD3 (FLOW)")
    path = F.save_code(code, tmp_path / "c.dpmcode.safetensors")
    raw = path.read_bytes()
    n_header = int.from_bytes(raw[:8], "little")
    rng = random.Random(12)
    bad = tmp_path / "bad.dpmcode.safetensors"
    variants = 0
    accepted = []
    for i in range(len(raw)):
        masks = {rng.randrange(1, 256)}
        if raw[i] == 0x20:  # whitespace-for-whitespace keeps the JSON valid
            masks |= {0x20 ^ 0x09, 0x20 ^ 0x0A, 0x20 ^ 0x0D}
        for m in masks:
            b = bytearray(raw)
            b[i] ^= m
            bad.write_bytes(bytes(b))
            variants += 1
            try:
                F.load_code(bad)
                accepted.append((i, m))
            except pack.samplers.CodeError as e:
                assert "bad.dpmcode.safetensors" in str(e), str(e)
    assert not accepted, f"{len(accepted)} flipped files loaded: {accepted[:10]}"
    assert variants > len(raw) and 8 + n_header < len(raw)
    # the original still loads bit for bit
    back = F.load_code(path)
    assert torch.equal(back.noises, code.noises) and back.latent_format == "SD3"


def test_data_flip_says_checksum_mismatch(pack, A, F, tmp_path):
    path = F.save_code(small_code(pack.samplers), tmp_path / "d.dpmcode.safetensors")
    b = bytearray(path.read_bytes())
    b[-5] ^= 0x40  # inside residual's bytes: still a well-formed file
    path.write_bytes(bytes(b))
    with pytest.raises(A.ArtifactError, match=r"d\.dpmcode\.safetensors: the file is corrupt \(checksum mismatch\)"):
        F.load_code(path)


def test_json_valid_header_edits_are_refused(pack, A, F, tmp_path):
    """Edits that keep the header valid JSON and the layout consistent: only the digest can catch them."""
    code = small_code(pack.samplers)
    path = F.save_code(code, tmp_path / "j.dpmcode.safetensors")
    raw = path.read_bytes()
    cases = {
        "eta": (b'"eta":"0.2"', b'"eta":"0.3"'),
        "family key renamed": (b'"family":', b'"famila":'),
        "digest key renamed": (b'"sha256":"sha256:', b'"sha257":"sha256:'),
        "digest prefix damaged": (b'"sha256":"sha256:', b'"sha256":"sha255:'),
    }
    for label, (old, new) in cases.items():
        assert raw.count(old) == 1, label
        (tmp_path / "e.dpmcode.safetensors").write_bytes(raw.replace(old, new))
        with pytest.raises(A.ArtifactError, match="corrupt") as ei:
            F.load_code(tmp_path / "e.dpmcode.safetensors")
        assert "e.dpmcode.safetensors" in str(ei.value), label
    # both digest markers removed (two edits, not one flip): a version-2 code still needs its checksum
    stripped = raw.replace(b'"sha256":"sha256:', b'"sha257":"sha255:')
    (tmp_path / "s.dpmcode.safetensors").write_bytes(stripped)
    with pytest.raises(A.ArtifactError, match="without its checksum"):
        F.load_code(tmp_path / "s.dpmcode.safetensors")


def test_truncation_empty_pickle_and_huge_shape(pack, A, F, tmp_path):
    path = F.save_code(small_code(pack.samplers), tmp_path / "t.dpmcode.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    for cut in (0, 1, 7, 8, 9, 8 + n // 2, 8 + n, len(raw) - 1):
        (tmp_path / "cut.dpmcode.safetensors").write_bytes(raw[:cut])
        with pytest.raises(A.ArtifactError, match="cut.dpmcode.safetensors: the file is corrupt"):
            F.load_code(tmp_path / "cut.dpmcode.safetensors")
    import pickle

    (tmp_path / "p.dpmcode.safetensors").write_bytes(pickle.dumps({"noises": [1.0] * 100}))
    with pytest.raises(A.ArtifactError, match="corrupt"):
        F.load_code(tmp_path / "p.dpmcode.safetensors")
    torch.save({"x": torch.zeros(3)}, str(tmp_path / "z.dpmcode.safetensors"))  # a zip-pickle
    with pytest.raises(A.ArtifactError, match="corrupt"):
        F.load_code(tmp_path / "z.dpmcode.safetensors")
    header = json.loads(raw[8:8 + n])
    header["noises"]["shape"] = [2 ** 40, 2 ** 40, 4, 2, 2]
    hb = json.dumps(header).encode()
    (tmp_path / "h.dpmcode.safetensors").write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    with pytest.raises(A.ArtifactError, match="declares shape"):
        F.load_code(tmp_path / "h.dpmcode.safetensors")


def test_old_version_1_file_loads_with_one_warning(pack, F, tmp_path, caplog):
    code = small_code(pack.samplers)
    path = write_v1_code(tmp_path / "old.dpmcode.safetensors", code, F)
    with caplog.at_level(logging.WARNING, logger="dpm_latent"):
        a = F.load_code(path)
        b = F.load_code(path)
    warnings = [r for r in caplog.records if "old.dpmcode.safetensors" in r.getMessage()]
    assert len(warnings) == 1 and "no checksum" in warnings[0].getMessage()
    for k in ("sigmas", "start_mean", "start_noise", "noises", "residual"):
        assert torch.equal(getattr(a, k), getattr(code, k)) and torch.equal(getattr(b, k), getattr(code, k))
    assert a.latent_format is None and a.latent_scale_factor is None and a.model_type is None


def test_code_keeps_its_latent_space_and_extra_tensors_are_covered(pack, A, F, tmp_path):
    code = small_code(pack.samplers, latent_format="SD15", latent_scale_factor=0.18215, model_type="SD15 (EPS)")
    path = F.save_code(code, tmp_path / "m.dpmcode.safetensors")
    back = F.load_code(path)
    assert (back.latent_format, back.latent_scale_factor, back.model_type) == ("SD15", 0.18215, "SD15 (EPS)")
    _t, meta = A.load_artifact(path, F.FORMAT_NAME)
    assert meta["format_version"] == "2" and meta["latent_format"] == "SD15"
    # an optional extra tensor (e.g. a mask) is covered by the digest like every other one
    tensors = F.code_tensors(code)
    tensors["mask"] = torch.ones(1, 1, 2, 2)
    A.save_artifact(tmp_path / "x.dpmcode.safetensors", tensors, F.code_metadata(code))
    raw = bytearray((tmp_path / "x.dpmcode.safetensors").read_bytes())
    _t, _m = A.load_artifact(tmp_path / "x.dpmcode.safetensors", F.FORMAT_NAME)
    assert torch.equal(_t["mask"], tensors["mask"])
    one = torch.ones(1, dtype=torch.float32).numpy().tobytes()
    pos = bytes(raw).find(one * 4)
    raw[pos + 3] ^= 0x01
    (tmp_path / "x.dpmcode.safetensors").write_bytes(bytes(raw))
    with pytest.raises(A.ArtifactError, match="checksum mismatch"):
        A.load_artifact(tmp_path / "x.dpmcode.safetensors", F.FORMAT_NAME)
