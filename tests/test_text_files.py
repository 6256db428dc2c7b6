"""--prompt-file and --text-file: the bytes of the file are the text (a `\\r` stays), and a file
that is not UTF-8 is a clear error with exit status 2, not a traceback (attack report F6, F7);
`positronic tokenize` needs no --model (the packaged demo model, as the README says; F9)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from positronic import cli
from positronic.flags import read_text_file
from tests.loop_fixtures import env

CRLF = "line one\r\nline two\r"


def test_a_text_file_is_read_byte_for_byte(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(CRLF.encode())
    assert read_text_file(str(f)) == CRLF
    f.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match=r"p\.txt: not UTF-8 \(byte 3"):
        read_text_file(str(f))
    f.write_bytes(b"a" * 10_000 + b"\xff")
    with pytest.raises(ValueError, match=r"byte 10000: b'\\xff'"):
        read_text_file(str(f))
    with pytest.raises(ValueError, match="missing"):
        read_text_file(str(tmp_path / "missing"))


def test_tokenize_keeps_carriage_returns_with_the_demo_model_by_default(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_bytes(CRLF.encode())
    assert cli.main(["tokenize", "--text-file", str(f), "--json"]) == 0
    pieces = json.loads(capsys.readouterr().out)["pieces"]
    assert pieces.count("<0x0D>") == 2


@pytest.mark.parametrize("command", ["tokenize", "generate"])
def test_a_file_that_is_not_utf8_exits_2_with_a_message(tmp_path, capsys, caplog, command):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"once \xc3(")
    flag = "--text-file" if command == "tokenize" else "--prompt-file"
    assert cli.main([command, flag, str(f)]) == 2
    err = capsys.readouterr().err + caplog.text  # generate logs it, tokenize prints it
    assert "bad.txt: not UTF-8" in err and "Traceback" not in err


def test_generate_echoes_the_prompt_file_exactly(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(CRLF.encode())
    cmd = [sys.executable, "-m", "positronic.cli", "generate", "--prompt-file", str(f)]
    cmd += ["--max-new-tokens", "2", "--seed", "2"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(CRLF.encode())
