"""roikit.io: JSON lines cut short by a kill, temporaries of interrupted writes, output folders and file names."""
from __future__ import annotations

import pytest

from roikit.io import append_jsonl, atomic_write_text, file_in, output_dir, read_jsonl, remove_stale_temporaries


def test_a_line_cut_short_is_skipped_by_the_reader_and_cut_off_by_the_next_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"iter": 1})
    append_jsonl(path, {"iter": 2})
    with open(path, "a") as f:
        f.write('{"iter": 3, "lo')  # a kill in the middle of the write
    assert read_jsonl(path) == [{"iter": 1}, {"iter": 2}]
    append_jsonl(path, {"iter": 3})  # the resumed run goes on
    assert path.read_text() == '{"iter": 1}\n{"iter": 2}\n{"iter": 3}\n'
    assert read_jsonl(path) == [{"iter": 1}, {"iter": 2}, {"iter": 3}]
    path.write_text('{"iter": 1')  # nothing whole at all
    append_jsonl(path, {"iter": 1})
    assert path.read_text() == '{"iter": 1}\n'


def test_a_whole_line_that_is_not_json_is_an_error_naming_it(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl, line 3: not JSON \("):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n')  # the last line, but whole (it has its newline): not a kill's doing
    with pytest.raises(ValueError, match=r"m.jsonl, line 2: not JSON"):
        read_jsonl(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"cannot read .*m.jsonl"):
        read_jsonl(path)


def test_stale_temporaries_of_the_named_files_are_removed(tmp_path):
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    stale = [tmp_path / ".checkpoint.pth.x7_k2abc.tmp", tmp_path / ".config_resume_120.yaml.qq.tmp"]
    kept = [tmp_path / ".eval_metrics.json.abc.tmp", tmp_path / ".checkpoint.pth", tmp_path / "checkpoint.pth.tmp"]
    for i, path in enumerate(stale + kept):
        path.write_bytes(b"x" * (10 + i))
    assert remove_stale_temporaries(tmp_path, ["checkpoint.pth", "config_resume_*.yaml"]) == (2, 21)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.yaml"] + [p.name for p in kept])
    assert remove_stale_temporaries(tmp_path / "missing", ["checkpoint.pth"]) == (0, 0)


def test_output_dir_and_file_names(tmp_path):
    assert output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=rf"^--out {tmp_path / 'file'} is a file, not a folder$"):
        output_dir(tmp_path / "file", "--out")
    with pytest.raises(ValueError, match=r"^--out .*: cannot create the folder: "):
        output_dir(tmp_path / "file" / "sub", "--out")
    assert file_in(tmp_path, "eval_x", "--name") == tmp_path / "eval_x"
    for name in ("../../x", "a/b", "", ".", "..", ".hidden", "/abs", "a\\b"):
        with pytest.raises(ValueError, match=r"--name .* must be a plain file name"):
            file_in(tmp_path, name, "--name")
