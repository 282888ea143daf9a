"""Config fuzz: whatever TOML value (any type, size or encoding) reaches whatever key, `ndde train
--dry-run` and `ndde submit --dry-run` either accept the job or exit 2 with one line on stderr,
and write nothing either way."""

import contextlib
import dataclasses
import io
import json
import math
import pathlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import cli, config
from tests.pipeline_helpers import TINY_HNN

BASE = config.tomllib.loads(TINY_HNN.format(data="/nonexistent/ndde-fuzz/tiny.h5", steps=6, every=2,
                                            sensitivity="backprop"))
KEYS = [(s, f.name) for s, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)]
KEYS += [("model", "no_such_key"), ("no_such_section", "x"), ("", "name")]
PATHS = ["/dev/null", "/", ".", "..", "/etc/passwd", "~", "", "runs", "a\nb", 'a"b', "\r", "x" * 5000]


def _toml(value) -> str:
    """``value`` as a TOML literal (strings through JSON's escapes, which TOML reads alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return value  # a raw TOML fragment (a date, a deep nest)


scalars = st.one_of(
    st.booleans(), st.integers(), st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 10**400, -10**400]),
    st.floats(), st.sampled_from([1e308, -0.0, 5e-324, 1e-300]), st.text(max_size=40), st.sampled_from(PATHS),
    st.sampled_from(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z"]))
values = st.one_of(scalars, st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                                         | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8),
                   st.integers(2, 6000).map(lambda depth: "[" * depth + "]" * depth))


def _job_text(section, key, value) -> str:
    raw = {s: dict(t) if isinstance(t, dict) else t for s, t in BASE.items()}
    if section == "":
        raw[key] = value
    else:
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][key] = value
    lines = [f"{k} = {_toml(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for s, table in raw.items():
        if isinstance(table, dict):
            lines += [f"[{s}]"] + [f"{json.dumps(k)} = {_toml(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


ENCODINGS = st.sampled_from(["utf-8", "utf-16", "latin-1", "garbage"])


def _encode(text, encoding) -> bytes:
    if encoding == "garbage":
        return b"\xff\xfe\x00\x80" + text.encode("utf-8", "surrogatepass")
    return text.encode(encoding, "replace")


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=values, encoding=ENCODINGS, command=st.sampled_from(["train", "submit"]),
       run_dir_given=st.booleans())
def test_any_value_is_accepted_or_refused_in_one_line_writing_nothing(tmp_path, key, value, encoding, command,
                                                                        run_dir_given):
    job = tmp_path / "job.toml"
    job.write_bytes(_encode(_job_text(*key, value), encoding))
    before = _listing(tmp_path)
    args = [command, str(job), "--dry-run"] + (["--run-dir", str(tmp_path / "run")] if run_dir_given else [])
    args += ["--backend", "mpi"] if command == "submit" else []
    err, out = io.StringIO(), io.StringIO()
    with contextlib.chdir(tmp_path), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main(args)  # relative defaults (runs/<name>, data/<name>.h5) fall in tmp_path
    assert rc in (0, 2), (rc, err.getvalue())
    if rc == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ndde {command}: error: "), err.getvalue()
    assert _listing(tmp_path) == before


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), text=st.text(max_size=60))
def test_any_set_override_is_accepted_or_refused_in_one_line(tmp_path, key, text):
    job = tmp_path / "job.toml"
    job.write_text(_job_text("", "name", "tiny"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["train", str(job), "--run-dir", str(tmp_path / "run"), "--dry-run",
                       "--set", f"{key[0]}.{key[1]}={text}"])
    assert rc in (0, 2), (rc, err.getvalue())
    if rc == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ndde train: error: "), err.getvalue()
    assert not (tmp_path / "run").exists()
