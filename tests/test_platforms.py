"""The Python code paths that differ by platform, run here with the platform faked.

Windows: the CUDA loader's DLL search (``os.add_dll_directory``, NVIDIA's ``bin`` layouts, the
messages for a load failure that names no DLL), free RAM from ``GlobalMemoryStatusEx``, and a
bundle swap that a file Windows cannot delete must not block. macOS: free RAM from ``vm_stat``.
What cannot be faked (the real loader, kernel32, vm_stat's numbers) is listed as untested in
the README's platform table.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

import pid_native
from pid_native import memory
from pid_native.provisioning import install

CUDALIBS = Path(pid_native.__file__).with_name("_cudalibs.py")
DLL_LOAD_FAILED = "DLL load failed while importing _native: The specified module could not be found."


@pytest.fixture
def windows_cudalibs(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh ``_cudalibs`` imported as on Windows, its ``os.add_dll_directory`` recording."""
    monkeypatch.setattr(sys, "platform", "win32")
    spec = importlib.util.spec_from_file_location("cudalibs_windows", CUDALIBS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    added: list[str] = []

    def add_dll_directory(path: str) -> str:
        assert Path(path).is_dir(), path
        added.append(path)
        # What the fake extension below checks before it "loads".
        monkeypatch.setenv("FAKE_DLL_DIRECTORIES", os.pathsep.join(added))
        return path

    monkeypatch.setattr(os, "add_dll_directory", add_dll_directory, raising=False)
    monkeypatch.delenv("FAKE_DLL_DIRECTORIES", raising=False)
    module.added = added  # type: ignore[attr-defined]
    return module


def windows_wheels(tmp_path: Path) -> tuple[list[Path], dict[str, Path]]:
    """NVIDIA's Windows wheels in both layouts: DLLs one directory below ``bin`` (CUDA 13's
    ``bin/x64``) and in ``bin`` itself (12.x, ``curand/bin``), with decoys; returns the two
    roots and, by soname, the DLL to pick."""
    a, b = tmp_path / "site_a" / "nvidia", tmp_path / "site_b" / "nvidia"
    cu13 = a / "cu13" / "bin" / "x64"
    want = {
        "libcudart.so.13": cu13 / "cudart64_13.dll",
        "libcublasLt.so.13": cu13 / "cublasLt64_13.dll",
        "libcublas.so.13": cu13 / "cublas64_13.dll",
        "libcurand.so.10": b / "curand" / "bin" / "curand64_10.dll",
        "libnvrtc.so.13": cu13 / "nvrtc64_130_0.dll",
    }
    decoys = [
        cu13 / "nvrtc-builtins64_130.dll",
        a / "cu13" / "lib" / "libcublas.so.13",
        b / "cublas" / "bin" / "cublas64_12.dll",
        b / "cu13" / "bin" / "cublas64_13.dll",
    ]
    for f in [*want.values(), *decoys]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"MZ")
    return [a, b], want


def fake_extension(root: Path, name: str) -> str:
    """A package whose ``_native`` fails as Windows does until a DLL directory is added."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    failing = f"if not os.environ.get('FAKE_DLL_DIRECTORIES'):\n    raise ImportError({DLL_LOAD_FAILED!r})\n"
    (pkg / "_native.py").write_text(f"import os\n{failing}")
    return f"{name}._native"


def test_windows_finder_takes_the_dlls_of_both_wheel_layouts(
    windows_cudalibs: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots, want = windows_wheels(tmp_path)
    monkeypatch.setattr(windows_cudalibs, "nvidia_roots", lambda: roots)
    found = windows_cudalibs.find_libraries()
    assert list(found) == [soname for soname, _ in windows_cudalibs.LIBRARIES]
    assert found == want
    assert windows_cudalibs.DRIVER == "nvcuda.dll"


def test_windows_preload_adds_each_dll_directory_once(windows_cudalibs: ModuleType, tmp_path: Path) -> None:
    _, want = windows_wheels(tmp_path)
    assert windows_cudalibs.preload(want) == {}
    cu13 = str(want["libcudart.so.13"].parent)
    assert windows_cudalibs.added == [cu13, str(want["libcurand.so.10"].parent)]


def test_windows_import_retries_after_adding_the_dll_directories(
    windows_cudalibs: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots, _ = windows_wheels(tmp_path)
    monkeypatch.setattr(windows_cudalibs, "nvidia_roots", lambda: roots)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = fake_extension(tmp_path, "fakewin_ok")
    assert windows_cudalibs.import_native(name).__name__ == name
    assert len(windows_cudalibs.added) == 2


@pytest.mark.parametrize("driver_loads", [False, True])
def test_windows_failure_naming_no_dll_blames_the_driver_else_the_missing_dll(
    windows_cudalibs: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver_loads: bool
) -> None:
    roots, want = windows_wheels(tmp_path)
    want["libcurand.so.10"].unlink()
    monkeypatch.setattr(windows_cudalibs, "nvidia_roots", lambda: roots)
    monkeypatch.setattr(windows_cudalibs, "_driver_loads", lambda: driver_loads)
    monkeypatch.setattr(os, "add_dll_directory", lambda path: path)  # adds, yet the DLL stays missing
    monkeypatch.syspath_prepend(str(tmp_path))
    name = fake_extension(tmp_path, f"fakewin_{driver_loads}")
    with pytest.raises(ImportError) as caught:
        windows_cudalibs.import_native(name)
    message = str(caught.value)
    assert DLL_LOAD_FAILED in message
    if driver_loads:
        assert "cannot load curand64_10*.dll" in message and 'pip install "pid-native[cuda]"' in message
        assert ".so" not in message.split(": it is not in", 1)[0]
    else:
        assert "cannot load nvcuda.dll" in message and "install the NVIDIA driver" in message


VM_STAT = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               12000.
Pages active:                            400000.
Pages inactive:                          300000.
Pages speculative:                         5000.
Pages throttled:                              0.
Pages wired down:                        150000.
Pages purgeable:                           9000.
"Translation faults":                 123456789.
Pages stored in compressor:              200000.
"""


def fake_vm_stat(bin_dir: Path, output: str, status: int = 0) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "vm_stat"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\nexit {status}\n")
    script.chmod(0o755)


@pytest.mark.skipif(shutil.which("sh") is None, reason="fakes vm_stat with a shell script")
def test_macos_free_ram_is_vm_stats_free_speculative_and_inactive_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    fake_vm_stat(tmp_path / "bin", VM_STAT)
    assert memory.available_ram_bytes() == (12000 + 5000 + 300000) * 16384
    # A vm_stat that fails, or whose output lacks a count, leaves the fallback.
    fake_vm_stat(tmp_path / "bin", VM_STAT, status=1)
    assert memory.available_ram_bytes() == 16 * memory.GIB
    fake_vm_stat(tmp_path / "bin", VM_STAT.replace("Pages inactive", "Pages idle"))
    assert memory.available_ram_bytes() == 16 * memory.GIB
    (tmp_path / "bin" / "vm_stat").unlink()
    assert memory.available_ram_bytes() == 16 * memory.GIB


class _Kernel32:
    """GlobalMemoryStatusEx as Windows answers it: fills the caller's MEMORYSTATUSEX."""

    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def GlobalMemoryStatusEx(self, ref: object) -> int:
        status = ref._obj  # type: ignore[attr-defined]
        # Windows refuses a structure whose dwLength is not the size it expects.
        assert status.dwLength == ctypes.sizeof(status) == 64
        status.ullTotalPhys, status.ullAvailPhys = 32 * memory.GIB, 7 * memory.GIB
        return int(self.ok)


@pytest.mark.parametrize("ok", [True, False])
def test_windows_free_ram_is_avail_phys_of_global_memory_status(
    monkeypatch: pytest.MonkeyPatch, ok: bool
) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "windll", type("WinDLL", (), {"kernel32": _Kernel32(ok)}), raising=False)
    assert memory.available_ram_bytes() == (7 if ok else 16) * memory.GIB


def test_other_unixes_count_free_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "freebsd14")
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}

    def sysconf(name: str) -> int:
        if name not in pages:
            raise ValueError("unrecognized configuration name")  # as os.sysconf says it
        return pages[name]

    monkeypatch.setattr(os, "sysconf", sysconf)
    assert memory.available_ram_bytes() == 1000 * 4096
    del pages["SC_AVPHYS_PAGES"]
    assert memory.available_ram_bytes() == 16 * memory.GIB


def test_a_swap_is_not_blocked_by_an_old_bundle_windows_could_not_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows deletes no file another process holds open: ``held`` stands for one."""
    real_rmtree = shutil.rmtree

    def rmtree_sparing_held_files(path: Path, ignore_errors: bool = False) -> None:
        assert ignore_errors
        if not (Path(path).exists() and any(Path(path).rglob("held"))):
            real_rmtree(path, ignore_errors=True)
            return
        for p in Path(path).rglob("*"):
            if p.is_file() and p.name != "held":
                p.unlink()

    monkeypatch.setattr(install.shutil, "rmtree", rmtree_sparing_held_files)
    root = tmp_path / "bundles" / "sdxl"
    for generation in range(3):
        staging = tmp_path / "bundles" / f"staging{generation}"
        staging.mkdir(parents=True)
        (staging / "generation").write_text(str(generation))
        (staging / "held").write_text("open in another process")
        install._swap(staging, root)
        assert (root / "generation").read_text() == str(generation)
    # Each replaced bundle's held file is all that is left of it.
    left = sorted(p.name for p in root.parent.iterdir() if p != root)
    assert len(left) == 2 and all(name.startswith(".sdxl.old.") for name in left)
    assert all([f.name for f in (root.parent / name).iterdir()] == ["held"] for name in left)
