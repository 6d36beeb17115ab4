"""Differential test: every package string the webhook accepts is read by pip exactly as
written.

Strings come from the webhook's own requirement and validation tests plus generated ones. The
webhook's verdict comes from `kaspr-packages-webhook validate`; pip's reading from pip's own
requirements-file parser (the installer hands requirements to pip with `-r`), which uses the
`packaging` library pip vendors for PEP 508. A string the webhook accepts fails the test when
pip cannot read it, reads more or less than the line (a joined next line, a comment, an
option), reads it as a local file, as editable, or with another name or URL.
"""

import importlib.util
import json
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from pip._internal.network.session import PipSession
from pip._internal.req.constructors import install_req_from_parsed_requirement
from pip._internal.req.req_file import parse_requirements

from helpers import INSTALLER

REPO = Path(__file__).resolve().parents[2]
SENTINEL = "kaspr-parity-sentinel==1.0"

spec = importlib.util.spec_from_file_location("kaspr_installer", INSTALLER)
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)


def _rust_string(literal: str) -> str:
    """The value of a Rust string literal body (the escapes the test sources use)."""
    escapes = {"n": "\n", "t": "\t", "0": "\0", "\\": "\\", '"': '"', "'": "'", "r": "\r"}
    out, i = [], 0
    while i < len(literal):
        ch = literal[i]
        if ch == "\\" and i + 1 < len(literal):
            out.append(escapes.get(literal[i + 1], literal[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def strings_from_tests() -> list:
    """Package strings of the webhook's requirement and validation tests."""
    found = []
    case = re.compile(r'#\[case::\w+\(\s*"((?:[^"\\]|\\.)*)"')
    for path in sorted((REPO / "src" / "requirement").glob("*.rs")):
        found += [_rust_string(m.group(1)) for m in case.finditer(path.read_text())]
    packages = re.compile(r'"packages":\s*\[([^\]]*)\]')
    literal = re.compile(r'"((?:[^"\\]|\\.)*)"')
    for path in sorted((REPO / "src" / "validation").glob("*.rs")):
        for block in packages.finditer(path.read_text()):
            found += [_rust_string(m.group(1)) for m in literal.finditer(block.group(1))]
    return found


def generated(count: int, seed: int = 20261202) -> list:
    """Strings from a small grammar around the edges pip and PEP 508 disagree on."""
    rnd = random.Random(seed)
    names = ["requests", "zope.interface", "typing_extensions", "A-b.C_d", "other.tar.gz",
             "pkg.whl", "pkg.zip", "x1", "git", "name.tar"]
    extras = ["", "[socks]", "[a,b]", "[ a ]"]
    ops = ["==", ">=", "<", "~=", "!=", "===", ""]
    versions = ["1", "1.0", "2.31.0", "1.*", "1.0+cpu", "1!2.0", "1.0rc1", "1\\", "1.0.post1.dev3",
                "1#x", "1-x"]
    markers = ["", "; python_version >= '3.8'", " ; sys_platform == 'linux'", ";os_name=='posix'",
               "; platform_machine == ' -x'", "; sys_platform == 'a #b'", "; extra == 'test'",
               "; python_version >= \"3.8\" and os_name == 'nt'"]
    urls = ["https://files.example.com/p-1.0-py3-none-any.whl",
            "git+https://github.com/org/repo.git@v1.2.0",
            "git+https://github.com/org/mono.git#subdirectory=libs/x",
            "git+https://github.com/org/mono.git#subdirectory=../..",
            "git+ssh://git@github.com/org/private.git@abc123",
            "git@github.com:org/repo.git", "git@github.com:org/repo.git@v1",
            "https://pkgs.example.com:8443/x-1.0.tar.gz?raw=1", "hg+https://hg.example.com/repo@tip"]
    out = []
    for _ in range(count):
        shape = rnd.random()
        if shape < 0.55:
            spec = ""
            for _ in range(rnd.choice([0, 1, 1, 2])):
                op = rnd.choice(ops)
                spec += ("," if spec else "") + (op + rnd.choice(versions) if op else "")
            out.append(rnd.choice(names) + rnd.choice(extras) + spec.strip(",") + rnd.choice(markers))
        elif shape < 0.85:
            sep = rnd.choice([" @ ", "@", " @"])
            out.append(rnd.choice(names) + rnd.choice(extras) + sep + rnd.choice(urls)
                       + rnd.choice(["", " ; python_version >= '3.8'", "; os_name == 'posix'"]))
        else:
            out.append(rnd.choice(urls) + rnd.choice(["", " ; python_version >= '3.8'", "  # c"]))
    return out


def webhook_binary() -> Path:
    explicit = os.environ.get("KASPR_WEBHOOK_BINARY")
    if explicit:
        return Path(explicit)
    binary = REPO / "target" / "debug" / "kaspr-packages-webhook"
    if not binary.exists():
        subprocess.run(["cargo", "build", "--quiet", "--bin", "kaspr-packages-webhook"], cwd=REPO,
                       check=True, timeout=1800)
    return binary


def accepted_by_webhook(strings: list) -> dict:
    """string -> True when `validate` accepts a KasprApp listing only that package."""
    docs = []
    for i, pkg in enumerate(strings):
        app = {"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
               "metadata": {"name": "p%d" % i, "namespace": "parity"},
               "spec": {"pythonPackages": {"packages": [pkg]}}}
        declared = sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", pkg)))
        if declared:
            app["spec"]["template"] = {"pythonPackagesInitContainer": {
                "env": [{"name": name, "value": "tok"} for name in declared]}}
        docs.append(json.dumps(app))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "apps.yaml"
        path.write_text("\n---\n".join(docs) + "\n")
        proc = subprocess.run([str(webhook_binary()), "validate", str(path)], capture_output=True,
                              text=True, timeout=300)
    verdicts = {}
    line = re.compile(r"KasprApp p(\d+)(?: \(document \d+\))?: (valid|invalid)$")
    for text in proc.stdout.splitlines():
        match = line.search(text)
        if match:
            verdicts[strings[int(match.group(1))]] = match.group(2) == "valid"
    assert len(verdicts) == len(set(strings)), proc.stdout[-2000:] + proc.stderr[-2000:]
    return verdicts


def pip_line(pkg: str) -> str:
    """What the installer hands pip for this package string (variables expanded)."""
    names = sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", pkg)))
    expanded = installer.expand_packages([pkg], {n: "tok" for n in names}, installer.Redactor(), names)[0]
    return installer.pip_requirement(expanded)


def pip_disagreement(pkg: str):
    """Why pip reads `pkg` otherwise than written, or None when it reads it as written."""
    line = pip_line(pkg)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(line + "\n" + SENTINEL + "\n")
    try:
        parsed = list(parse_requirements(f.name, session=PipSession()))
        if [p.requirement for p in parsed] != [line, SENTINEL]:
            return "pip reads the lines %r" % [p.requirement for p in parsed]
        first = parsed[0]
        if first.is_editable or first.options:
            return "pip reads it as editable or with options %r" % first.options
        req = install_req_from_parsed_requirement(first)
    except Exception as exc:  # pip's own parse error: a disagreement to report, not a crash
        return "pip cannot read it: %s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    finally:
        os.unlink(f.name)
    url = installer.requirement_url(line)
    if req.link is not None:
        if req.link.scheme == "file" or req.link.is_file:
            return "pip reads it as the local file %s" % req.link.url
        if url is None:
            return "pip reads a URL %s the webhook did not see" % req.link.url
        if req.link.url != url:
            return "pip reads the URL %s, not %s" % (req.link.url, url)
    elif url is not None:
        return "pip reads no URL, the webhook saw %s" % url
    written = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?=\s*[\[@;<>=!~(]|\s*$)", line)
    if written and not line.lstrip().startswith(("git@",)) and "://" not in line.split("@", 1)[0]:
        if req.name is None or canonicalize_name(req.name) != canonicalize_name(written.group(1)):
            return "pip reads the name %r, not %r" % (req.name, written.group(1))
        if url is None:
            try:
                Requirement(line)
            except InvalidRequirement as exc:
                return "packaging rejects it: %s" % exc
    return None


@pytest.fixture(scope="module")
def verdicts():
    strings = list(dict.fromkeys(strings_from_tests() + generated(1500)))
    return accepted_by_webhook(strings)


def test_the_corpus_exercises_both_verdicts(verdicts):
    accepted = sum(verdicts.values())
    assert accepted >= 100 and len(verdicts) - accepted >= 100, (accepted, len(verdicts))


def test_pip_reads_every_accepted_string_as_written(verdicts):
    disagreements = []
    for pkg, ok in verdicts.items():
        if ok:
            why = pip_disagreement(pkg)
            if why:
                disagreements.append("%r: %s" % (pkg, why))
    assert not disagreements, "%d accepted strings pip reads differently:\n%s" % (
        len(disagreements), "\n".join(sorted(disagreements)[:60]))
