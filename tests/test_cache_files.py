"""The kernel cache's file checks: private directories, owned plain files, recorded hashes."""

from __future__ import annotations

import os

import pytest

from tvmgroup import cache_files


def test_private_dirs_are_created_0700_and_checked(tmp_path):
    root = tmp_path / "kernels"
    leaf = root / "a" / "b"
    cache_files.make_private_dirs(root, leaf)
    assert oct(leaf.stat().st_mode & 0o777) == "0o700"
    os.chmod(root, 0o757)
    with pytest.raises(cache_files.UntrustedCache, match=r"kernels is writable by others \(mode 0o757\)"):
        cache_files.check_private_dirs(root, leaf)


def test_a_link_in_place_of_a_directory_is_refused(tmp_path):
    root = tmp_path / "kernels"
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    root.mkdir(mode=0o700)
    (root / "a").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(cache_files.UntrustedCache, match="not a directory"):
        cache_files.check_private_dirs(root, root / "a")


def test_checked_file_wants_the_recorded_hash_and_no_link(tmp_path):
    path = tmp_path / "k.so"
    path.write_bytes(b"library bytes")
    digest = cache_files.sha256_of(path)
    assert cache_files.checked_file(path, digest) == path
    path.write_bytes(b"library bytes, changed")
    with pytest.raises(cache_files.UntrustedCache, match="SHA-256"):
        cache_files.checked_file(path, digest)
    link = tmp_path / "link.so"
    link.symlink_to(path)
    with pytest.raises(cache_files.UntrustedCache, match="not a plain file"):
        cache_files.owned_file(link)


def test_publish_writes_through_a_private_directory(tmp_path):
    target = tmp_path / "entry.so"
    with cache_files.private_workdir(tmp_path) as work:
        assert oct(work.stat().st_mode & 0o777) == "0o700"
        digest = cache_files.publish(work, "entry.so", target, lambda p: p.write_bytes(b"x"))
    assert target.read_bytes() == b"x" and digest == cache_files.sha256_of(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.so"]
