"""The object store against real git-annex: same layout, modes, locks, retention and transfer files.

Oracles: `git annex` (add, copy, contentlocation, fsck, drop) in repositories it created, and
the real `git-annex-shell p2pstdio` driven by hand (PUT, GET, LOCKCONTENT), whose files we
compare with ours and whose locks must stop us (and ours them). Lock holders in "another
process" are forked children, because a lock must be seen across processes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import multiprocessing
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

import pytest

from git_remote_annexproxy.keys import BadKey, Key
from git_remote_annexproxy.store import AnnexStore, ContentLocked, TransferInProgress
from git_remote_annexproxy.storefs import format_time, parse_time

CLIENT_UUID = "d21e0000-0000-4000-8000-00000000d21e"
FORK = multiprocessing.get_context("fork")
GITCONFIG = "[user]\n\tname = t\n\temail = t@example.invalid\n[init]\n\tdefaultBranch = main\n"


def sha_key(data: bytes, ext: str = ".bin") -> Key:
    return Key.parse(f"SHA256E-s{len(data)}--{hashlib.sha256(data).hexdigest()}{ext}")


def put(store: AnnexStore, key: Key, data: bytes) -> bool:
    with store.begin_receive(key) as r:
        r.write(data)
        return r.finish()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def tree(root: Path) -> set[str]:
    """Every path under root (relative), symlinks not followed."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


# -- real git / git-annex -------------------------------------------------------------


@pytest.fixture
def gitenv(tmp_path: Path, annex_bin: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(GITCONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        HOME=str(home),
        PATH=f"{annex_bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        GIT_CONFIG_NOSYSTEM="1",
        LC_ALL="C.UTF-8",
    )
    return env


def run(env: dict[str, str], cwd: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


@pytest.fixture
def nonbare(tmp_path: Path, gitenv: dict[str, str]) -> Path:
    repo = tmp_path / "work"
    run(gitenv, tmp_path, "git", "init", "-q", str(repo))
    run(gitenv, repo, "git", "annex", "init", "-q", "work")
    return repo


@pytest.fixture
def bare(tmp_path: Path, gitenv: dict[str, str]) -> Path:
    repo = tmp_path / "bare.git"
    run(gitenv, tmp_path, "git", "init", "-q", "--bare", str(repo))
    run(gitenv, repo, "git", "annex", "init", "-q", "bare")
    return repo


def annex_add(env: dict[str, str], repo: Path, name: str, data: bytes) -> Key:
    (repo / name).write_bytes(data)
    run(env, repo, "git", "annex", "add", "-q", name)
    run(env, repo, "git", "commit", "-qm", name)
    return Key.parse(run(env, repo, "git", "annex", "lookupkey", name).strip())


def content_location(env: dict[str, str], repo: Path, key: Key) -> Path | None:
    out = run(env, repo, "git", "annex", "contentlocation", str(key), check=False).strip()
    return (repo / out).resolve() if out else None


def bare_with_real_object(
    env: dict[str, str], tmp_path: Path, bare: Path, data: bytes, name: str = "real.bin"
) -> tuple[Path, Key]:
    """Have real git-annex store `data` in `bare` (copy --to from a clone); the clone, key."""
    clone = tmp_path / "clone"
    run(env, tmp_path, "git", "clone", "-q", str(bare), str(clone))
    run(env, clone, "git", "annex", "init", "-q", "clone")
    key = annex_add(env, clone, name, data)
    run(env, clone, "git", "annex", "copy", "-q", "--to", "origin", name)
    return clone, key


def store_for(repo: Path) -> AnnexStore:
    if repo.name.endswith(".git"):
        return AnnexStore(repo, bare=True)
    return AnnexStore(repo / ".git", bare=False)


# -- the real git-annex-shell ---------------------------------------------------------


@pytest.fixture
def real_shell(tmp_path: Path) -> Path:
    """git-annex's own git-annex-shell: its multicall binary under that name.

    (The venv's `git-annex-shell` script is ours, so it cannot serve as the oracle.)
    """
    spec = importlib.util.find_spec("git_annex")
    if spec is None or spec.origin is None:
        pytest.skip("the git-annex wheel is not installed")
    binary = Path(spec.origin).parent / "git-annex"
    if not binary.is_file():
        pytest.skip("the git-annex wheel has no binary")
    link = tmp_path / "realbin" / "git-annex-shell"
    link.parent.mkdir()
    link.symlink_to(binary)
    return link


class RealP2P:
    """A hand-driven `git-annex-shell p2pstdio` session (protocol version 4)."""

    def __init__(self, shell: Path, repo: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [str(shell), "p2pstdio", str(repo), CLIENT_UUID],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        assert self.line().startswith("AUTH-SUCCESS ")
        self.send(b"VERSION 4\n")
        assert self.line() == "VERSION 4"

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it gave up reading (see finish() for why)

    def line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no line from git-annex-shell (have {buf!r})")
            byte = os.read(fd, 1)
            if not byte:
                return buf.decode()  # EOF
            buf += byte
        return buf[:-1].decode()

    def finish(self) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        code = self.proc.wait(30)
        return code, self.proc.stderr.read().decode()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- other processes ------------------------------------------------------------------


@contextmanager
def in_child(body: Callable[[], None]) -> Iterator[multiprocessing.process.BaseProcess]:
    """Run `body` in a forked child; the test joins or kills it."""
    proc = FORK.Process(target=body)
    proc.start()
    try:
        yield proc
    finally:
        if proc.is_alive():
            proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()


@contextmanager
def held_in_child(
    enter: Callable[[], AbstractContextManager[object]],
    then: Callable[[], None] | None = None,
) -> Iterator[multiprocessing.process.BaseProcess]:
    """Another process enters `enter()` (and runs `then`), and stays inside until we leave.

    The test may SIGKILL the child while inside. The handshake uses pipes, not
    multiprocessing.Event, whose set() hangs once a waiter has been killed.
    """
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()

    def body() -> None:
        os.close(ready_r)
        os.close(release_w)
        with enter():
            if then is not None:
                then()
            os.write(ready_w, b"!")
            os.read(release_r, 1)  # returns at EOF: the parent closed its end

    proc = FORK.Process(target=body)
    proc.start()
    os.close(ready_w)
    os.close(release_r)
    try:
        while not select.select([ready_r], [], [], 0.05)[0]:
            assert proc.is_alive(), f"child died before getting ready (exit {proc.exitcode})"
        assert os.read(ready_r, 1) == b"!", f"child died before getting ready ({proc.exitcode})"
        yield proc
    finally:
        os.close(release_w)
        os.close(ready_r)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()


# == layout ===========================================================================


def test_nonbare_layout_matches_git_annex(nonbare: Path, gitenv: dict[str, str]) -> None:
    key = annex_add(gitenv, nonbare, "f.txt", b"hello world\n")
    real = content_location(gitenv, nonbare, key)
    assert real is not None
    store = store_for(nonbare)
    assert store.find_object(key) == real
    assert store.object_path(key) == real
    assert real.relative_to(nonbare).parts[:5] == (".git", "annex", "objects", "J7", "0G")
    fh = store.open_object(key)
    assert fh is not None
    with fh:
        assert fh.read() == b"hello world\n"


def test_bare_layout_matches_git_annex(bare: Path, gitenv: dict[str, str], tmp_path: Path) -> None:
    _, key = bare_with_real_object(gitenv, tmp_path, bare, b"hello world\n", "f.txt")
    real = content_location(gitenv, bare, key)
    assert real is not None
    store = store_for(bare)
    assert store.find_object(key) == real
    assert store.object_path(key) == real
    assert real.relative_to(bare).parts[:4] == ("annex", "objects", "e7d", "d01")


def test_object_in_the_other_scheme_is_found_like_git_annex(
    bare: Path, gitenv: dict[str, str]
) -> None:
    # A bare repository converted from non-bare keeps mixed-case dirs; both look there too.
    data = b"in the mixed-case place\n"
    key = sha_key(data)
    mixed = bare / "annex" / "objects" / key.hashdir_mixed() / key.keyfile() / key.keyfile()
    mixed.parent.mkdir(parents=True)
    mixed.write_bytes(data)
    assert content_location(gitenv, bare, key) == mixed
    assert store_for(bare).find_object(key) == mixed
    assert store_for(bare).object_path(key) != mixed  # new objects still go to lower-case


@pytest.mark.parametrize("kind", ["bare", "nonbare"])
def test_stored_object_passes_real_fsck_with_git_annex_modes(
    kind: str, request: pytest.FixtureRequest, gitenv: dict[str, str], tmp_path: Path
) -> None:
    repo: Path = request.getfixturevalue(kind)
    # Something git-annex stored itself in this repository, to compare modes with.
    if kind == "bare":
        _, theirs = bare_with_real_object(gitenv, tmp_path, repo, b"stored by git-annex\n")
    else:
        theirs = annex_add(gitenv, repo, "theirs.txt", b"stored by git-annex\n")
    store = store_for(repo)
    data = os.urandom(5000)
    key = sha_key(data)
    assert put(store, key, data)

    ours_path, their_path = store.find_object(key), store.find_object(theirs)
    assert ours_path is not None and their_path is not None
    assert ours_path == store.object_path(key)
    # object 0444, key dir 0555, hash dirs as git-annex made them (0777 minus umask)
    for mine, real in zip(ours_path.parents, their_path.parents, strict=False):
        if mine == repo:
            break
        assert mode(mine) == mode(real), mine
    assert mode(ours_path) == mode(their_path) == 0o444
    assert mode(ours_path.parent) == 0o555
    assert not store.partial_path(key).exists()

    uuid = run(gitenv, repo, "git", "config", "annex.uuid").strip()
    run(gitenv, repo, "git", "annex", "setpresentkey", str(key), uuid, "1")
    out = run(gitenv, repo, "git", "annex", "fsck", "--key", str(key))
    assert "(checksum...) ok" in out


def test_remove_leaves_the_tree_as_git_annex_drop_does(
    nonbare: Path, gitenv: dict[str, str]
) -> None:
    annex_add(gitenv, nonbare, "a.txt", b"dropped by git-annex\n")
    key_b = annex_add(gitenv, nonbare, "b.txt", b"removed by us\n")
    objects = nonbare / ".git" / "annex" / "objects"
    h1, h2 = key_b.hashdir_mixed().split("/")
    kf = key_b.keyfile()
    run(gitenv, nonbare, "git", "annex", "drop", "--force", "a.txt")
    # git-annex removed a's key dir and every hash dir that became empty: only b's remain.
    assert tree(objects) == {h1, f"{h1}/{h2}", f"{h1}/{h2}/{kf}", f"{h1}/{h2}/{kf}/{kf}"}
    store = store_for(nonbare)
    assert store.remove(key_b)
    assert tree(objects) == set()  # and so do we
    assert content_location(gitenv, nonbare, key_b) is None
    assert store.remove(key_b)  # never present: still True


# == receiving ========================================================================


def test_resume_after_a_cut_transfer(bare: Path) -> None:
    store = store_for(bare)
    data = b"the whole content\n"
    key = sha_key(data)
    with store.begin_receive(key) as r:
        assert r.offset == 0
        r.write(data[:3])
    # Left without finish: the partial stays, so the next PUT answers PUT-FROM 3.
    assert store.partial_path(key).read_bytes() == data[:3]
    assert mode(store.partial_path(key)) == 0o666 & ~_umask()
    assert not store.has(key)
    with store.begin_receive(key) as r:
        assert r.offset == 3
        r.write(data[3:])
        assert r.finish()
    path = store.find_object(key)
    assert path is not None and path.read_bytes() == data
    assert not store.partial_path(key).exists()
    assert os.listdir(bare / "annex" / "transfer" / "download" / "lck") == []


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_wrong_content_is_refused_and_nothing_kept(bare: Path) -> None:
    store = store_for(bare)
    key = sha_key(b"right bytes\n")
    with store.begin_receive(key) as r:
        r.write(b"wrong bytes\n")  # same length, other hash
        assert not r.finish()
    assert not store.has(key)
    assert not store.partial_path(key).exists()
    assert not (bare / "annex" / "objects" / key.hashdir_lower()).exists()


def test_short_content_is_refused(bare: Path) -> None:
    store = store_for(bare)
    key = sha_key(b"twelve bytes")
    with store.begin_receive(key) as r:
        r.write(b"twelve")
        assert not r.finish()
    assert not store.has(key)
    assert not store.partial_path(key).exists()


def test_more_data_than_the_key_size_is_refused_before_writing(bare: Path) -> None:
    store = store_for(bare)
    key = sha_key(b"12345")
    with store.begin_receive(key) as r:
        r.write(b"123")
        with pytest.raises(OSError) as info:
            r.write(b"456")
        assert info.value.errno == errno.EFBIG
    assert store.partial_path(key).read_bytes() == b"123"


def test_partial_larger_than_the_key_is_discarded(bare: Path) -> None:
    store = store_for(bare)
    data = b"small\n"
    key = sha_key(data)
    store.partial_path(key).parent.mkdir(parents=True, exist_ok=True)
    store.partial_path(key).write_bytes(b"far too many bytes for this key")
    with store.begin_receive(key) as r:
        assert r.offset == 0
        r.write(data)
        assert r.finish()
    assert store.has(key)


def test_unverifiable_key_is_checked_for_size_only(bare: Path) -> None:
    store = store_for(bare)
    key = Key.parse("WORM-s5-m1700000000--plain.txt")
    assert put(store, key, b"abcde")
    key2 = Key.parse("WORM-s5-m1700000000--other.txt")
    with store.begin_receive(key2) as r:
        r.write(b"abcd")
        assert not r.finish()
    assert not store.has(key2)


def test_sigkill_mid_write_leaves_no_object_and_a_resumable_partial(bare: Path) -> None:
    store = store_for(bare)
    data = os.urandom(100_000)
    key = sha_key(data)
    ready = FORK.Event()

    def body() -> None:
        r = store.begin_receive(key)
        r.write(data[:40_000])
        ready.set()
        time.sleep(60)

    with in_child(body) as child:
        assert ready.wait(30)
        child.kill()
        child.join()
    assert not store.has(key)
    with store.begin_receive(key) as r:  # the dead child's lock went with it
        assert r.offset == 40_000
        r.write(data[40_000:])
        assert r.finish()
    path = store.find_object(key)
    assert path is not None and path.read_bytes() == data


def test_sigkill_between_verify_and_rename(bare: Path) -> None:
    """Catalogue row 30: no object, the complete partial resumes at its full size."""
    store = store_for(bare)
    data = os.urandom(10_000)
    key = sha_key(data)

    def body() -> None:
        def die(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        os.rename = die  # only in this child
        with store.begin_receive(key) as r:
            r.write(data)
            r.finish()

    with in_child(body) as child:
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
    assert not store.has(key)
    with store.begin_receive(key) as r:
        assert r.offset == len(data)
        assert r.finish()  # re-verified from disk
    path = store.find_object(key)
    assert path is not None and path.read_bytes() == data


def test_second_receiver_of_a_key_is_refused(bare: Path) -> None:
    store = store_for(bare)
    data = b"contended\n"
    key = sha_key(data)
    with held_in_child(lambda: store.begin_receive(key)), pytest.raises(TransferInProgress):
        store.begin_receive(key)
    # In one process too (open-file-description locks conflict with each other).
    with store.begin_receive(key), pytest.raises(TransferInProgress):
        store.begin_receive(key)
    assert put(store, key, data)


def test_finish_when_the_object_appeared_meanwhile(bare: Path) -> None:
    store = store_for(bare)
    data = b"raced\n"
    key = sha_key(data)
    with store.begin_receive(key) as r:
        r.write(data)
        # Someone else committed the same key (here: in the other hash scheme).
        other = bare / "annex" / "objects" / key.hashdir_mixed() / key.keyfile()
        other.mkdir(parents=True)
        (other / key.keyfile()).write_bytes(data)
        assert r.finish()
    assert store.find_object(key) == other / key.keyfile()
    assert not store.partial_path(key).exists()
    assert not store.object_path(key).exists()


def test_no_space_keeps_a_resumable_partial(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_for(bare)
    data = os.urandom(1000)
    key = sha_key(data)
    real_pwrite = os.pwrite

    def full_disk(fd: int, buf: bytes, offset: int) -> int:
        if offset >= 600:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, memoryview(buf)[: 600 - offset], offset)  # short write

    with store.begin_receive(key) as r:
        monkeypatch.setattr(os, "pwrite", full_disk)
        with pytest.raises(OSError) as info:
            r.write(data)
        assert info.value.errno == errno.ENOSPC
        monkeypatch.undo()
    assert store.partial_path(key).read_bytes() == data[:600]
    with store.begin_receive(key) as r:
        assert r.offset == 600
        r.write(data[600:])
        assert r.finish()


def test_io_error_deletes_the_partial(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_for(bare)
    data = os.urandom(1000)
    key = sha_key(data)

    def broken(fd: int, buf: bytes, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    with store.begin_receive(key) as r:
        r.write(data[:100])
        monkeypatch.setattr(os, "pwrite", broken)
        with pytest.raises(OSError) as info:
            r.write(data[100:])
        assert info.value.errno == errno.EIO
        monkeypatch.undo()
        with pytest.raises(ValueError, match="finished or discarded"):
            r.write(b"x")
    assert not store.partial_path(key).exists()
    with store.begin_receive(key) as r:
        assert r.offset == 0


# == locks and retention ==============================================================


def test_remove_refused_while_another_process_holds_a_shared_lock(bare: Path) -> None:
    store = store_for(bare)
    data = b"locked content\n"
    key = sha_key(data)
    assert put(store, key, data)
    with held_in_child(lambda: store.lock_shared(key)):
        with pytest.raises(ContentLocked):
            store.remove(key)
        assert store.has(key)
        with store.lock_shared(key):  # shared locks coexist
            pass
        # Ours ended but the child's is held: the lock file stays.
        assert Path(f"{store.find_object(key)}.lck").exists()
    assert store.remove(key)
    assert not store.has(key)


def test_lock_shared_on_absent_or_exclusively_locked_content(bare: Path) -> None:
    store = store_for(bare)
    data = b"being removed\n"
    key = sha_key(data)
    with pytest.raises(FileNotFoundError), store.lock_shared(key):
        pass
    assert put(store, key, data)
    lck = f"{store.find_object(key)}.lck"

    def remover() -> AbstractContextManager[object]:
        # git-annex's kind of lock (classic fcntl), as its drop takes it.
        fd = os.open(lck, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        return open(fd)

    with held_in_child(remover), pytest.raises(ContentLocked), store.lock_shared(key):
        pass


def test_real_git_annex_drop_respects_our_lock(nonbare: Path, gitenv: dict[str, str]) -> None:
    key = annex_add(gitenv, nonbare, "f.txt", b"keep me\n")
    store = store_for(nonbare)
    with held_in_child(lambda: store.lock_shared(key)):
        out = run(gitenv, nonbare, "git", "annex", "drop", "--force", "f.txt", check=False)
        assert "content is locked" in out
        assert content_location(gitenv, nonbare, key) is not None
    # Released (and the lock file cleaned up): now git-annex can drop it.
    assert not Path(f"{store.find_object(key)}.lck").exists()
    run(gitenv, nonbare, "git", "annex", "drop", "--force", "f.txt")
    assert not store.has(key)


def test_retention_in_the_future_refuses_removal_also_for_git_annex(
    nonbare: Path, gitenv: dict[str, str]
) -> None:
    key = annex_add(gitenv, nonbare, "f.txt", b"retained\n")
    store = store_for(nonbare)
    obj = store.find_object(key)
    assert obj is not None
    before = time.time_ns()
    store.write_retention(key, 100)
    rtm = Path(f"{obj}.rtm").read_text()
    assert re.fullmatch(r"\d{10}\.\d{1,9}s", rtm)  # no newline, like git-annex's
    until = parse_time(rtm)
    assert until is not None and before + 100 * 10**9 <= until <= time.time_ns() + 100 * 10**9
    store.write_retention(key, 10)  # never shortened
    assert Path(f"{obj}.rtm").read_text() == rtm
    assert mode(obj.parent) == 0o555  # thawed and frozen again

    with pytest.raises(ContentLocked, match="retained"):
        store.remove(key)
    out = run(gitenv, nonbare, "git", "annex", "drop", "--force", "f.txt", check=False)
    assert "content is locked" in out  # git-annex reads our .rtm
    assert store.has(key)
    assert not Path(f"{obj}.lck").exists()  # the refused remover cleaned up its lock file


def test_stale_retention_is_cleaned_by_remove(bare: Path) -> None:
    store = store_for(bare)
    data = b"retention expired\n"
    key = sha_key(data)
    assert put(store, key, data)
    obj = store.find_object(key)
    assert obj is not None
    store.write_retention(key, -5)  # already in the past
    assert Path(f"{obj}.rtm").exists() and Path(f"{obj}.rtl").exists()
    assert store.remove(key)
    assert not obj.parent.exists()  # object, .rtm, .rtl, .lck and the key dir all gone
    assert not obj.parent.parent.exists()


def test_retention_survives_a_killed_holder_and_clear_respects_other_holders(
    bare: Path,
) -> None:
    store = store_for(bare)
    data = b"drop proof\n"
    key = sha_key(data)
    assert put(store, key, data)
    obj = store.find_object(key)
    assert obj is not None

    with held_in_child(lambda: store.lock_shared(key), lambda: store.write_retention(key)) as c:
        # While another holder is inside, our normal unlock must leave its retention.
        with store.lock_shared(key):
            store.write_retention(key)
            store.clear_retention(key)
        assert Path(f"{obj}.rtm").exists()
        c.kill()  # the connection died: its lock goes, its retention stays
        c.join()
    with pytest.raises(ContentLocked, match="retained"):
        store.remove(key)
    # A later holder's normal unlock (last holder) drops it, as git-annex does.
    with store.lock_shared(key):
        store.clear_retention(key)
    assert not Path(f"{obj}.rtm").exists() and not Path(f"{obj}.lck").exists()
    assert store.remove(key)


def test_remove_proceed_hook_runs_under_the_lock(bare: Path) -> None:
    store = store_for(bare)
    data = b"remove before\n"
    key = sha_key(data)
    assert put(store, key, data)
    lck = Path(f"{store.object_path(key)}.lck")
    seen: list[bool] = []

    def late() -> bool:
        seen.append(lck.exists())
        return False

    assert not store.remove(key, proceed=late)
    assert seen == [True] and store.has(key) and not lck.exists()
    assert store.remove(key, proceed=lambda: True)
    assert not store.has(key)


def test_time_format_matches_haskell_show() -> None:
    assert format_time(1795563163_808174719) == "1795563163.808174719s"
    assert format_time(1_500_000_000) == "1.5s"
    assert format_time(2_000_000_000) == "2s"
    assert parse_time("1795563163.808174719s") == 1795563163_808174719
    assert parse_time("2s") == 2 * 10**9
    assert parse_time("1.5000000000001s") == 1_500_000_000  # picoseconds truncated
    assert parse_time("garbage") is None


# == the real git-annex-shell as peer =================================================


def test_real_git_annex_shell_and_we_share_the_receive_lock_and_partial(
    bare: Path, gitenv: dict[str, str], real_shell: Path
) -> None:
    store = store_for(bare)
    data = os.urandom(10_000_000)
    key = sha_key(data)
    kf = key.keyfile()
    transfer = bare / "annex" / "transfer"
    info_file = transfer / "download" / CLIENT_UUID / kf
    partial = store.partial_path(key)

    # 1. git-annex receives, and stalls after 70000 bytes (under its 1% progress step, so
    # its info file has no byte count). It writes the partial in chunks of its own.
    real = RealP2P(real_shell, bare, gitenv)
    try:
        real.send(f"PUT some%dir/big.bin {key}\n".encode())
        assert real.line() == "PUT-FROM 0"
        real.send(f"DATA {len(data)}\n".encode() + data[:70_000])
        wait_for(lambda: partial.exists() and partial.stat().st_size > 0, "git-annex's partial")
        wait_for(lambda: info_file.exists() and info_file.stat().st_size > 0, "transfer info")
        theirs_files = tree(transfer)
        theirs_info = info_file.read_text()
        with pytest.raises(TransferInProgress):  # its key-wide download lock stops us
            store.begin_receive(key)
    finally:
        real.kill()  # the connection dies mid-DATA
    got = partial.stat().st_size
    assert 0 < got <= 70_000

    # 2. We resume git-annex's partial, recording the transfer the way it does.
    with (
        store.begin_receive(key) as r,
        store.transfer("download", CLIENT_UUID, key, "some_dir/big.bin"),
    ):
        assert r.offset == got
        assert tree(transfer) == theirs_files
        ours_info = info_file.read_text()
        # Start time as git-annex shows a POSIXTime, no progress yet, the file, newline.
        time_re = r"\d{10}(\.\d{1,9})?s"
        assert re.fullmatch(time_re + r"\nsome_dir/big\.bin\n", theirs_info)
        assert re.sub(time_re, "T", ours_info) == re.sub(time_re, "T", theirs_info)

        # 3. ...and while we hold it, git-annex is refused.
        real = RealP2P(real_shell, bare, gitenv)
        real.send(f"PUT x {key}\n".encode())
        assert real.line() == f"PUT-FROM {got}"
        real.send(f"DATA {len(data) - got}\n".encode() + data[got:] + b"VALID\n")
        code, err = real.finish()
        assert code != 0 and "transfer already in progress" in err
        r.write(data[got:])
        assert r.finish()
    # Lock and info files deleted at the end, directories kept, as git-annex leaves them.
    assert {p for p in tree(transfer) if kf in p} == set()
    uuid = run(gitenv, bare, "git", "config", "annex.uuid").strip()
    run(gitenv, bare, "git", "annex", "setpresentkey", str(key), uuid, "1")
    assert "(checksum...) ok" in run(gitenv, bare, "git", "annex", "fsck", "--key", str(key))


def test_upload_transfer_files_match_git_annex(
    bare: Path, gitenv: dict[str, str], real_shell: Path
) -> None:
    store = store_for(bare)
    data = os.urandom(1_000_000)  # more than a pipe holds, so git-annex stalls sending
    key = sha_key(data)
    assert put(store, key, data)
    kf = key.keyfile()
    upload = bare / "annex" / "transfer" / "upload"
    real = RealP2P(real_shell, bare, gitenv)
    try:
        real.send(f"GET 0 other%file {key}\n".encode())
        info_file = upload / CLIENT_UUID / kf
        theirs: list[str] = []

        def complete_info() -> bool:
            # git-annex rewrites it in place for progress: keep a complete reading.
            with suppress(FileNotFoundError):
                text = info_file.read_text()
                if text.count("\n") == 2:
                    theirs.append(text)
            return bool(theirs)

        wait_for(complete_info, "git-annex's upload info")
        theirs_files = tree(upload)
        theirs_info = theirs[0]
    finally:
        real.kill()
    for leftover in (upload / CLIENT_UUID).iterdir():  # a killed git-annex leaves its files
        leftover.unlink()
    with store.transfer("upload", CLIENT_UUID, key, "other_file") as info:
        assert (
            tree(upload)
            == theirs_files
            == {CLIENT_UUID, f"{CLIENT_UUID}/{kf}", f"{CLIENT_UUID}/lck.{kf}"}
        )
        ours = (upload / CLIENT_UUID / kf).read_text()
        # git-annex had already sent some of it: "<time>s <bytes>\nother_file\n".
        assert re.fullmatch(r"\d{10}(\.\d{1,9})?s( \d+)?\nother_file\n", theirs_info)
        assert re.fullmatch(r"\d{10}(\.\d{1,9})?s\nother_file\n", ours)
        info.update(9_999)  # under 1% of the size: not worth a rewrite
        assert (upload / CLIENT_UUID / kf).read_text() == ours
        info.update(10_000)
        assert (upload / CLIENT_UUID / kf).read_text() == ours.replace("s\n", "s 10000\n", 1)
        with pytest.raises(TransferInProgress), store.transfer("upload", CLIENT_UUID, key, None):
            pass
    assert tree(upload) == {CLIENT_UUID}


def test_real_lockcontent_blocks_our_remove_and_its_retention_binds_us(
    bare: Path, gitenv: dict[str, str], real_shell: Path
) -> None:
    store = store_for(bare)
    data = b"locked by git-annex\n"
    key = sha_key(data)
    assert put(store, key, data)
    obj = store.find_object(key)
    assert obj is not None
    real = RealP2P(real_shell, bare, gitenv)
    real.send(f"LOCKCONTENT {key}\n".encode())
    assert real.line() == "SUCCESS"
    with pytest.raises(ContentLocked):
        store.remove(key)
    rtm = Path(f"{obj}.rtm").read_text()
    until = parse_time(rtm)
    assert until is not None and format_time(until) == rtm  # same format both ways
    assert 590 * 10**9 < until - time.time_ns() <= 600 * 10**9
    real.kill()  # connection gone without UNLOCKCONTENT: git-annex's retention stays
    with pytest.raises(ContentLocked, match="retained"):
        store.remove(key)
    assert store.has(key)


# == hostile paths ====================================================================


def test_symlinked_object_or_objects_dir_is_absent(bare: Path, tmp_path: Path) -> None:
    store = store_for(bare)
    data = b"outside the store\n"
    key = sha_key(data)
    outside = tmp_path / "outside"
    outside.write_bytes(data)
    keydir = store.object_path(key).parent
    keydir.mkdir(parents=True)
    store.object_path(key).symlink_to(outside)
    assert store.find_object(key) is None
    assert not store.has(key)
    assert store.open_object(key) is None
    with pytest.raises(FileNotFoundError), store.lock_shared(key):
        pass
    assert store.remove(key)
    assert outside.read_bytes() == data

    # A whole objects tree elsewhere, reached through a symlinked annex/objects.
    elsewhere = tmp_path / "elsewhere"
    shutil.move(bare / "annex" / "objects", elsewhere)
    moved = elsewhere / key.hashdir_lower() / key.keyfile() / key.keyfile()
    moved.unlink()
    moved.write_bytes(data)  # a real object, but only reachable through the symlink
    (bare / "annex" / "objects").symlink_to(elsewhere)
    assert store.find_object(key) is None
    # Refused as a symlink in the walk (storefs.py): opening a directory with O_DIRECTORY |
    # O_NOFOLLOW gives ENOTDIR for a symlink, opening a file with O_NOFOLLOW gives ELOOP.
    with pytest.raises(OSError) as info:
        put(store, sha_key(b"x"), b"x")
    assert info.value.errno == errno.ENOTDIR, info.value
    assert not (elsewhere / sha_key(b"x").hashdir_lower()).exists()


def test_fifo_at_the_object_path_does_not_block(bare: Path) -> None:
    store = store_for(bare)
    key = sha_key(b"fifo\n")
    store.object_path(key).parent.mkdir(parents=True)
    os.mkfifo(store.object_path(key))
    assert not store.has(key)
    assert store.open_object(key) is None


def test_symlinked_partial_or_tmp_dir_is_refused(bare: Path, tmp_path: Path) -> None:
    store = store_for(bare)
    data = b"partial\n"
    key = sha_key(data)
    target = tmp_path / "target"
    target.write_bytes(b"do not touch")
    tmp = bare / "annex" / "tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / key.keyfile()).symlink_to(target)
    with pytest.raises(OSError) as info:
        store.begin_receive(key)
    assert info.value.errno == errno.ELOOP, info.value
    assert target.read_bytes() == b"do not touch"
    # The receive lock was released on the way out.
    assert os.listdir(bare / "annex" / "transfer" / "download" / "lck") == []

    (tmp / key.keyfile()).unlink()
    tmp.rmdir()
    tmp.symlink_to(tmp_path)  # annex/tmp itself
    with pytest.raises(OSError) as info:
        store.begin_receive(key)
    assert info.value.errno == errno.ENOTDIR, info.value
    assert not (tmp_path / key.keyfile()).exists()


def test_symlinked_key_dir_is_not_written_through(bare: Path, tmp_path: Path) -> None:
    store = store_for(bare)
    data = b"commit target\n"
    key = sha_key(data)
    elsewhere = tmp_path / "keydir-elsewhere"
    elsewhere.mkdir()
    store.object_path(key).parent.parent.mkdir(parents=True)
    store.object_path(key).parent.symlink_to(elsewhere)
    with store.begin_receive(key) as r:
        r.write(data)
        with pytest.raises(OSError) as info:
            r.finish()
        assert info.value.errno == errno.ENOTDIR, info.value
    assert os.listdir(elsewhere) == []
    assert store.partial_path(key).read_bytes() == data  # kept, verified again on resume


def test_hostile_keys_stay_inside_the_annex(bare: Path, tmp_path: Path) -> None:
    store = store_for(bare)
    before = tree(tmp_path)
    evil = Key.parse("WORM-s1-m1--../../../../tmp/evil")
    assert put(store, evil, b"x")
    path = store.find_object(evil)
    assert path is not None
    assert path.name == "WORM-s1-m1--..%..%..%..%tmp%evil"
    assert path.parent.name == path.name and path.is_relative_to(bare / "annex" / "objects")
    odd = Key.parse("WORM-s1-m1--a%b&c:d")
    assert put(store, odd, b"y")
    assert store.find_object(odd) is not None
    assert store.find_object(odd).name == "WORM-s1-m1--a&sb&ac&cd"  # type: ignore[union-attr]

    with pytest.raises(BadKey):  # NUL cannot reach a path: the key is refused first
        Key.parse("WORM-s1-m1--a\0b")

    long = Key.parse("WORM-s1-m1--" + "a" * 4096)  # a valid key, too long for a file name
    assert store.find_object(long) is None and not store.has(long)
    assert store.open_object(long) is None
    with pytest.raises(OSError) as info:
        store.begin_receive(long)
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info, store.transfer("upload", CLIENT_UUID, long, None):
        pass
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(FileNotFoundError), store.lock_shared(long):
        pass
    assert store.remove(long)

    created = tree(tmp_path) - before
    assert all(p.startswith("bare.git/annex/") for p in created), created
    assert not Path("/tmp/evil").exists()
    assert os.listdir(bare / "annex" / "tmp") == []


@pytest.mark.parametrize("uuid", ["", ".", "..", "a/b", "../../x", "a\0b"])
def test_transfer_refuses_a_remote_uuid_that_is_not_one_name(bare: Path, uuid: str) -> None:
    store = store_for(bare)
    before = tree(bare)
    with (
        pytest.raises(ValueError, match="uuid"),
        store.transfer("upload", uuid, sha_key(b"k"), None),
    ):
        pass
    assert tree(bare) == before


def test_unprivileged_owner_works_in_frozen_directories() -> None:
    """As a normal user (mode bits apply), thaw and freeze around every change."""
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: the other tests cover this")
    root = Path(tempfile.mkdtemp(prefix="store-unpriv-"))
    try:
        gitdir = root / "repo.git"
        (gitdir / "annex").mkdir(parents=True)
        nobody = 65534
        for p in (root, gitdir, gitdir / "annex"):
            os.chown(p, nobody, nobody)
        data = b"as nobody\n"
        key = sha_key(data)

        def body() -> None:
            os.setgid(nobody)
            os.setuid(nobody)
            store = AnnexStore(gitdir, bare=True)
            with store.begin_receive(key) as r:
                r.write(data[:4])
            with store.begin_receive(key) as r:
                r.write(data[4:])
                assert r.finish()
            with store.lock_shared(key):
                store.write_retention(key, -1)
                store.clear_retention(key)
            store.write_retention(key, -1)
            assert store.remove(key)
            assert put(store, key, data)

        with in_child(body) as child:
            child.join(60)
            assert child.exitcode == 0
        store = AnnexStore(gitdir, bare=True)
        obj = store.find_object(key)
        assert obj is not None
        assert (mode(obj), mode(obj.parent)) == (0o444, 0o555)
        assert obj.stat().st_uid == nobody
    finally:
        shutil.rmtree(root)
