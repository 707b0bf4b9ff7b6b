"""Build the wheel and the sdist, install each in a fresh venv, and run the demo from it.

Run by .ci/run with the development venv's Python (which has ``build``):
``python .ci/check_dist.py``.  Exits non-zero, saying why, on the first problem.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0:
        sys.exit(f"check_dist: {' '.join(map(str, argv))} failed:\n{result.stdout}\n"
                 f"{result.stderr}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(url: str, method: str = "GET", data: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def check_contents(wheel: Path, sdist: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for wanted in ("wsgi_async/py.typed", "wsgi_async/cli.py", "/licenses/LICENSE"):
        if not any(name.endswith(wanted) for name in names):
            sys.exit(f"check_dist: {wheel.name} lacks {wanted}")
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    for wanted in ("/LICENSE", "/README.md", "/pyproject.toml", "/wsgi_async/py.typed"):
        if not any(name.endswith(wanted) for name in members):
            sys.exit(f"check_dist: {sdist.name} lacks {wanted}")


def check_install(artifact: Path, version: str, work: Path) -> None:
    """A fresh venv with only ``artifact`` installed runs ``wsgi-async demo`` end to end."""
    venv = work / f"venv-{artifact.suffix.lstrip('.')}"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "-q", artifact)
    command = venv / "bin" / "wsgi-async"
    shown = run(command, "--version").strip()
    if shown != f"wsgi-async {version}":
        sys.exit(f"check_dist: {artifact.name}: --version says {shown!r}, not {version}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (work / f"demo-{port}.log").open("w")
    process = subprocess.Popen([str(command), "demo", "--port", str(port)], cwd=work,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                sys.exit(f"check_dist: the demo exited with {process.returncode}")
            try:
                request(base + "/")
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("check_dist: the demo did not answer within 20 s")
                time.sleep(0.1)
        status, headers, body = request(base + "/reports?seconds=0.2", "POST", b"hello")
        if status != 202 or "Location" not in headers:
            sys.exit(f"check_dist: submit answered {status} {body!r}")
        # Location is absolute by default; a path (absolute_location=False) joins the same way.
        location = urllib.parse.urljoin(base + "/", headers["Location"])
        status, _, body = request(location, headers={"Prefer": "wait=10"})
        if status != 201 or json.loads(body)["you_sent"] != "hello":
            sys.exit(f"check_dist: the result was {status} {body!r}")
        # The base install is enough for the client too (its progress bar included).
        called = subprocess.run([str(command), "call", base + "/reports?seconds=0.3", "-d", "hi"],
                                capture_output=True, timeout=60)
        if (called.returncode != 0 or json.loads(called.stdout)["you_sent"] != "hi"
                or b"waiting for" not in called.stderr):
            sys.exit(f"check_dist: wsgi-async call exited {called.returncode}: "
                     f"{called.stdout!r} {called.stderr!r}")
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    print(f"check_dist: {artifact.name} installs in a fresh venv, serves the demo, and "
          "wsgi-async call follows it")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="wsgi-async-dist-") as tmp:
        work = Path(tmp)
        dist = work / "dist"
        run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
        (wheel,) = dist.glob("*.whl")
        (sdist,) = dist.glob("*.tar.gz")
        version = wheel.name.split("-")[1]
        check_contents(wheel, sdist)
        for artifact in (wheel, sdist):
            check_install(artifact, version, work)


if __name__ == "__main__":
    main()
