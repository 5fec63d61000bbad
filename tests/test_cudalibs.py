"""Preloading NVIDIA's PyPI runtime libraries for the CUDA build (pid_native._cudalibs).

Everything runs against real shared libraries: small C stubs compiled here and installed
under a temporary ``nvidia`` namespace package in both wheel layouts, and an "extension"
that dlopens a real library whose DT_NEEDED names them. Each check runs in a fresh
interpreter (``-S``: no site-packages, so the environment's own NVIDIA wheels stay out of
the namespace) that loads ``_cudalibs.py`` by path, and reads ``/proc/self/maps`` to see what
was really loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pid_native

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="builds ELF stubs and reads /proc/self/maps (Linux only)"
)

CUDALIBS = Path(pid_native.__file__).with_name("_cudalibs.py")
LOAD_ORDER = ["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libnvrtc.so.13"]

# Runs first in every child: `cudalibs` is the module under test, loaded without the package.
PRELUDE = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("cudalibs", {str(CUDALIBS)!r})
cudalibs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cudalibs)

def mapped():
    return sorted({{line.split()[-1] for line in open("/proc/self/maps") if ".so" in line}})
"""


def cc(out: Path, source: str, *link: str) -> Path:
    """Compile ``source`` into the shared library ``out`` with soname ``out.name``."""
    compiler = shutil.which("cc")
    assert compiler, "these tests build stub libraries and need a C compiler (cc)"
    src = out.parent / f"{out.name}.c"
    src.write_text(source)
    cmd = [compiler, "-shared", "-fPIC", "-o", str(out), str(src), f"-Wl,-soname,{out.name}"]
    done = subprocess.run([*cmd, "-Wl,--no-as-needed", *link], capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    src.unlink()
    return out


def stub(directory: Path, soname: str, *needs: Path) -> Path:
    """A stub ``soname`` exporting ``stub_<name>()``, linked against ``needs`` (no RUNPATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    link = [arg for dep in needs for arg in (f"-L{dep.parent}", f"-l:{dep.name}")]
    return cc(directory / soname, f"int stub_{symbol(soname)}(void) {{ return 13; }}\n", *link)


def symbol(soname: str) -> str:
    return soname.removeprefix("lib").split(".")[0].replace("-", "_")


def package(root: Path, extension: Path) -> Path:
    """A package ``fakepkg`` whose ``_native`` dlopens ``extension``."""
    pkg = root / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_native.py").write_text(f"import ctypes\nanswer = ctypes.CDLL({str(extension)!r}).answer()\n")
    return root


def fake_extension(root: Path, needs: str) -> Path:
    """A package ``fakepkg`` whose ``_native`` dlopens a library with DT_NEEDED on ``needs``.

    The stub it links against is deleted afterwards, as on a machine without that library.
    """
    build = root / "build"
    lib = stub(build, needs)
    source = f"int stub_{symbol(needs)}(void);\nint answer(void) {{ return stub_{symbol(needs)}() + 29; }}\n"
    ext = cc(root / "libfakeext.so", source, f"-L{build}", f"-l:{needs}")
    lib.unlink()
    return package(root, ext)


# A child's import of the fake extension through the loader: its error message and mapped libraries.
IMPORT_MESSAGE = """
try:
    cudalibs.import_native("fakepkg._native")
    message = "imported"
except ImportError as exc:
    message = str(exc)
print(json.dumps({"message": message, "maps": mapped()}))
"""


def run(code: str, *path: Path, isolated: bool = True, libraries: Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter with ``path`` on sys.path (and ``libraries`` on the
    loader's path); returns its last JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path)}
    if libraries is not None:
        env["LD_LIBRARY_PATH"] = str(libraries)
    flags = ["-S"] if isolated else []
    script = (PRELUDE if isolated else "") + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, *flags, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def loader_finds(soname: str) -> bool:
    """Whether the system's loader finds ``soname`` by itself (then a test of its absence can't run)."""
    code = f"import ctypes\ntry:\n    ctypes.CDLL({soname!r})\nexcept OSError:\n    raise SystemExit(1)\n"
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sys.path entries holding the ``nvidia`` namespace: CUDA 13 layout and 12.x layout.

    Returns the two roots and, by soname, the library the finder must pick.
    """
    a = tmp_path_factory.mktemp("site_a")
    b = tmp_path_factory.mktemp("site_b")
    cu13 = a / "nvidia" / "cu13" / "lib"
    cudart = stub(cu13, "libcudart.so.13")
    cublaslt = stub(cu13, "libcublasLt.so.13")
    # Like the real one, cuBLAS needs cuBLASLt; without a RUNPATH it loads only after cuBLASLt.
    cublas = stub(cu13, "libcublas.so.13", cublaslt)
    nvrtc = stub(cu13, "libnvrtc.so.13")
    # Decoys: a versioned name (not the soname), NVRTC's builtins, a 12.x soname, a later root.
    (cu13 / "libcublas.so.13.0.2.14").write_bytes(b"not a library")
    stub(cu13, "libnvrtc-builtins.so.13.0")
    stub(b / "nvidia" / "cublas" / "lib", "libcublas.so.12")
    stub(b / "nvidia" / "cu13" / "lib", "libcublas.so.13", cublaslt)
    curand = stub(b / "nvidia" / "curand" / "lib", "libcurand.so.10")
    return {
        "site_a": a,
        "site_b": b,
        "libcudart.so.13": cudart,
        "libcublasLt.so.13": cublaslt,
        "libcublas.so.13": cublas,
        "libcurand.so.10": curand,
        "libnvrtc.so.13": nvrtc,
    }


def test_finder_covers_both_layouts_in_load_order(wheels: dict[str, Path]) -> None:
    out = run(
        "print(json.dumps({k: str(v) for k, v in cudalibs.find_libraries().items()}))",
        wheels["site_a"],
        wheels["site_b"],
    )
    assert list(out) == LOAD_ORDER
    assert out == {name: str(wheels[name]) for name in LOAD_ORDER}


def test_finder_without_nvidia_wheels_finds_nothing() -> None:
    assert (
        run("print(json.dumps([str(r) for r in cudalibs.nvidia_roots()] + [*cudalibs.find_libraries()]))")
        == []
    )


def test_preload_loads_every_library_globally(wheels: dict[str, Path]) -> None:
    out = run(
        """
        import ctypes
        failures = cudalibs.preload(cudalibs.find_libraries())
        # What the extension's loader does: resolve a DT_NEEDED soname to the loaded library.
        value = ctypes.CDLL("libcublas.so.13").stub_cublas()
        print(json.dumps({"failures": failures, "maps": mapped(), "value": value}))
        """,
        wheels["site_a"],
        wheels["site_b"],
    )
    assert out["failures"] == {}
    assert set(map(str, (wheels[n] for n in LOAD_ORDER))) <= set(out["maps"])
    assert out["value"] == 13


def test_import_retries_after_preloading(wheels: dict[str, Path], tmp_path: Path) -> None:
    if loader_finds("libcublas.so.13"):
        pytest.skip("libcublas.so.13 is installed system-wide; the test needs it absent")
    ext = fake_extension(tmp_path, "libcublas.so.13")
    out = run(
        """
        import importlib
        try:
            importlib.import_module("fakepkg._native")
            plain = "imported"
        except OSError as exc:
            plain = str(exc)
        module = cudalibs.import_native("fakepkg._native")
        print(json.dumps({"plain": plain, "answer": module.answer, "maps": mapped()}))
        """,
        ext,
        wheels["site_a"],
        wheels["site_b"],
    )
    assert "libcublas.so.13" in out["plain"]
    assert out["answer"] == 42
    assert str(wheels["libcublas.so.13"]) in out["maps"]


def test_missing_runtime_library_is_named_with_the_fix(wheels: dict[str, Path], tmp_path: Path) -> None:
    if loader_finds("libcurand.so.10"):
        pytest.skip("libcurand.so.10 is installed system-wide; the test needs it absent")
    ext = fake_extension(tmp_path, "libcurand.so.10")
    # site_a alone: the CUDA 13 layout without cuRAND.
    out = run(
        IMPORT_MESSAGE,
        ext,
        wheels["site_a"],
    )
    message = out["message"]
    assert message.startswith(
        "the CUDA build of pid-native cannot load libcurand.so.10: it is not in NVIDIA's"
    )
    assert str(wheels["site_a"] / "nvidia") in message
    assert message.endswith('install NVIDIA\'s CUDA 13 runtime libraries with pip install "pid-native[cuda]"')
    # It did try: the libraries that are there were preloaded.
    assert str(wheels["libcublas.so.13"]) in out["maps"]


def test_missing_driver_is_named_and_nothing_is_preloaded(wheels: dict[str, Path], tmp_path: Path) -> None:
    if loader_finds("libcuda.so.1"):
        pytest.skip("an NVIDIA driver (libcuda.so.1) is installed here; the test needs it absent")
    ext = fake_extension(tmp_path, "libcuda.so.1")
    out = run(
        IMPORT_MESSAGE,
        ext,
        wheels["site_a"],
        wheels["site_b"],
    )
    assert out["message"] == (
        "the CUDA build of pid-native cannot load libcuda.so.1: no NVIDIA driver found: install the NVIDIA "
        "driver (580+ for CUDA 13) or install the CPU build of pid-native"
    )
    assert not [m for m in out["maps"] if "nvidia" in m]


def test_driver_older_than_the_build_is_named_with_its_cuda_version(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    if loader_finds("libcuda.so.1"):
        pytest.skip("an NVIDIA driver (libcuda.so.1) is installed here; the test needs its own")
    # Linked against a driver that has cuTooNew; the machine's driver supports CUDA 12.8 and lacks it.
    build, machine = tmp_path / "build", tmp_path / "machine"
    build.mkdir()
    machine.mkdir()
    version = "int cuDriverGetVersion(int *v) {{ *v = {}; return 0; }}\n"
    cc(build / "libcuda.so.1", "int cuTooNew(void) { return 0; }\n" + version.format(13000))
    source = "int cuTooNew(void);\nint answer(void) { return cuTooNew() + 42; }\n"
    ext = cc(tmp_path / "libfakeext.so", source, f"-L{build}", "-l:libcuda.so.1")
    cc(machine / "libcuda.so.1", version.format(12080))
    out = run(
        IMPORT_MESSAGE,
        package(tmp_path, ext),
        wheels["site_a"],
        libraries=machine,
    )
    assert out["message"] == (
        "the CUDA build of pid-native needs a newer NVIDIA driver: the installed one supports CUDA 12.8 "
        "and lacks cuTooNew, and this build needs CUDA 13.0 (driver 580 or newer); update the NVIDIA "
        "driver or install the CPU build of pid-native"
    )
    # The runtime wheels cannot stand in for the driver: nothing of theirs was loaded.
    assert not [m for m in out["maps"] if "nvidia" in m]


def test_unrelated_load_error_is_left_alone(wheels: dict[str, Path], tmp_path: Path) -> None:
    ext = fake_extension(tmp_path, "libdoesnotexist.so.13")
    out = run(
        """
        try:
            cudalibs.import_native("fakepkg._native")
            message = "imported"
        except OSError as exc:
            message = str(exc)
        print(json.dumps({"message": message, "maps": mapped()}))
        """,
        ext,
        wheels["site_a"],
        wheels["site_b"],
    )
    assert "libdoesnotexist.so.13: cannot open shared object file" in out["message"]
    assert not [m for m in out["maps"] if "nvidia" in m]


def test_package_import_loads_no_nvidia_library(wheels: dict[str, Path]) -> None:
    out = run(
        """
        import json, sys
        import pid_native, pid_native.backends.candle, pid_native.decoder
        native = sys.modules["pid_native._native"]
        maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if ".so" in line})
        print(json.dumps({
            "cuda": "cuda" in pid_native.build_info()["features"],
            "same": native is pid_native._native is pid_native.decoder._native
            is pid_native.backends.candle._native,
            "nvidia": [m for m in maps if "nvidia" in m],
        }))
        """,
        wheels["site_a"],
        wheels["site_b"],
        isolated=False,
    )
    assert out["same"], "some module imported the extension without pid_native's guarded import"
    if out["cuda"]:
        pytest.skip("the installed extension is the CUDA build; its libraries are meant to load")
    assert out["nvidia"] == []


@pytest.mark.parametrize(
    ("error", "library"),
    [
        ("libcublasLt.so.13: cannot open shared object file: No such file or directory", "libcublasLt.so.13"),
        ("/opt/x/libnvrtc.so.13: wrong ELF class: ELFCLASS32", "libnvrtc.so.13"),
        ("Could not find module 'cublas64_13.dll' (or one of its dependencies)", "cublas64_13.dll"),
        ("Could not find module 'nvrtc64_130_0.dll'", "nvrtc64_130_0.dll"),
        ("nvcuda.dll not found", "nvcuda.dll"),
        ("libcufft.so.12: cannot open shared object file", None),
        ("DLL load failed while importing _native: The specified module could not be found.", None),
    ],
)
def test_loader_messages_name_the_library(error: str, library: str | None) -> None:
    from pid_native._cudalibs import missing_library

    assert missing_library(error) == library


@pytest.mark.parametrize(
    ("error", "symbol", "driver"),
    [
        ("/x/_native.abi3.so: undefined symbol: cuMemcpyBatchAsync_v2", "cuMemcpyBatchAsync_v2", True),
        (
            "/x/_native.abi3.so: undefined symbol: cublasLtMatmulAlgoGetHeuristic",
            "cublasLtMatmulAlgoGetHeuristic",
            False,
        ),
        (
            "/x/_native.abi3.so: undefined symbol: cudaGetDriverEntryPointByVersion",
            "cudaGetDriverEntryPointByVersion",
            False,
        ),
        ("/x/_native.abi3.so: undefined symbol: PyObject_Foo", None, False),
    ],
)
def test_loader_messages_name_a_missing_cuda_function(error: str, symbol: str | None, driver: bool) -> None:
    from pid_native import _cudalibs

    assert _cudalibs.undefined_symbol(error) == symbol
    if symbol:
        message = _cudalibs.explain_symbol(symbol, error)
        assert symbol in message
        assert ("newer NVIDIA driver" in message) == driver
        assert ('pip install "pid-native[cuda]"' in message) == (not driver)
