"""bindguard.real_path, strict (the trust checks') and not (the unit lookup's), on one real tree of
links, against os.path.realpath as Python 3.11 gives it, and against the kernel where they part:
past its 40 links, which os.path follows on."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import bindguard

# name: target, made in a fresh directory beside dir/ (a directory holding `file` and sub/).
LINKS = {
    "abs": "{root}/dir",  # absolute
    "up": "dir/sub/..",  # relative, with `..` after a directory
    "chain": "abs/../up/file",  # `..` taken after the link before it is resolved
    "chain2": "chain",
    "gone": "nowhere/x",  # dangling
    "to-gone": "gone",
    "loop-a": "loop-b",
    "loop-b": "loop-a",
    "self": "self",
    "into-loop": "loop-a/../dir/file",
    "via-missing": "missing/../dir/file",  # os.path walks up again from what is missing
    "via-file": "dir/file/x",  # a file on the way
}
# (path below the tree, os.path.realpath(strict=True) resolves it): every one is resolved both ways.
PATHS = [("dir/file", True), ("abs", True), ("up/sub/../file", True), ("chain", True), ("chain2", True),
         ("abs/./sub//..", True), ("gone", False), ("to-gone", False), ("loop-a", False), ("self", False),
         ("into-loop", False), ("via-missing", False), ("missing/../dir/file", False), ("via-file", False),
         ("dir/file/x", False), ("c39", True)]
# Where the walk not strict gives the path to os.path.realpath itself (a loop; any relative path):
# comparing the two there would prove nothing, so only the strict walk is compared.
HANDED_TO_OS_PATH = ("loop-a", "self", "into-loop")


@pytest.fixture
def tree(tmp_path):
    root = Path(os.path.realpath(tmp_path))  # no link above: only the tree's own are counted
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_text("")
    for name, target in LINKS.items():
        (root / name).symlink_to(target.format(root=root))
    target = "dir/file"
    for i in range(bindguard.SYMLINKS_MAX + 1):  # c0 ... c40: c{n} passes n + 1 links
        (root / f"c{i}").symlink_to(target)
        target = f"c{i}"
    return root


def _kernel_refuses_with_eloop(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


@pytest.mark.parametrize("relative", [False, True])
def test_both_walks_resolve_as_os_path_does(tree, monkeypatch, relative):
    monkeypatch.chdir(tree)
    for below, resolves in PATHS:
        path = below if relative else f"{tree}/{below}"
        if not relative and below not in HANDED_TO_OS_PATH:
            assert bindguard.real_path(path, strict=False) == os.path.realpath(path), path
        if resolves:
            assert bindguard.real_path(path) == os.path.realpath(path, strict=True), path
        else:
            with pytest.raises(OSError):
                os.path.realpath(path, strict=True)
            with pytest.raises(OSError):
                bindguard.real_path(path)


def test_past_the_kernels_links_each_walk_stops_where_the_kernel_does(tree):
    """41 links in a chain: os.path follows them all, the kernel refuses with ELOOP. Strict raises
    ELOOP; not strict gives the path back as it is, so that opening it fails with ELOOP."""
    path = f"{tree}/c{bindguard.SYMLINKS_MAX}"
    assert os.path.realpath(path, strict=True) == f"{tree}/dir/file" and _kernel_refuses_with_eloop(path)
    with pytest.raises(OSError) as refused:
        bindguard.real_path(path)
    assert refused.value.errno == errno.ELOOP
    assert bindguard.real_path(path, strict=False) == path
    within = f"{tree}/c{bindguard.SYMLINKS_MAX - 1}"  # 40: the kernel follows them
    assert bindguard.real_path(within) == bindguard.real_path(within, strict=False) == f"{tree}/dir/file"


def test_one_link_passed_41_times_counts_41_times_in_the_strict_walk_alone(tree):
    """The kernel counts each time a link is passed, as the strict walk does; the walk that is not
    strict remembers where a link led, as os.path does, and counts different links."""
    path = f"{tree}/abs" + "/../abs" * bindguard.SYMLINKS_MAX + "/file"
    assert _kernel_refuses_with_eloop(path)
    links: list[str] = []
    with pytest.raises(OSError) as refused:
        bindguard.real_path(path, links)
    assert refused.value.errno == errno.ELOOP and links == [f"{tree}/abs"] * (bindguard.SYMLINKS_MAX + 1)
    links.clear()
    assert bindguard.real_path(path, links, strict=False) == os.path.realpath(path) == f"{tree}/dir/file"
    assert links == [f"{tree}/abs"] * (bindguard.SYMLINKS_MAX + 1)  # passed each time, walked once: no loop
