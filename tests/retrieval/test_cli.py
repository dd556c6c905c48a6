"""`lmforge index` / `lmforge search` as a user runs them: index a folder, search it, re-index incrementally,
and each mistake one line with exit code 2."""

from __future__ import annotations

from lmforge.cli import main


def _docs(d):
    d.mkdir()
    (d / "ops.md").write_text("# Logs\n\n## Rotation\n\nUse logrotate to rotate the logs daily.\n")
    (d / "backup.txt").write_text("Backups run nightly with restic to the NAS.\n")
    (d / "blob.txt").write_bytes(b"\x00\x01binary")
    return d


def test_index_then_search_then_reindex_only_what_changed(tmp_path, capsys):
    docs = _docs(tmp_path / "docs")
    assert main(["index", str(docs), "--name", "mydocs"]) == 0
    out, err = capsys.readouterr()
    assert "2 added" in out and "skipped 1 files" in err and "blob.txt (binary)" in err
    assert main(["search", "mydocs", "how do I rotate the logs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] ") and "ops.md:5-5" in out and "(Logs > Rotation)" in out and "logrotate" in out
    (docs / "backup.txt").write_text("Backups run hourly with borg.\n")
    assert main(["index", str(docs), "--name", "mydocs"]) == 0
    assert "0 added, 1 changed, 1 unchanged, 0 removed" in capsys.readouterr().out
    assert main(["search", "mydocs", "borg"]) == 0 and "backup.txt" in capsys.readouterr().out
    assert main(["search", "mydocs", '"NEAR( * -'])  == 0  # operators are words, never a crash


def test_mistakes_are_one_line(tmp_path, capsys):
    docs = _docs(tmp_path / "docs")
    for argv, needle in [(["search", "nope", "x"], "no index named nope"),
                         (["index", str(docs), "--name", "x", "--strict"], "blob.txt"),
                         (["index", str(tmp_path / "missing"), "--name", "x"], "no such file"),
                         (["index", str(docs), "--name", "Bad Name"], "invalid")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, (argv, err)
