"""Compile and link the C++ extension for arm64 macOS and arm64 Linux, on this x86-64 Linux.

No Mac and no arm64 Linux machine runs CI, so a change that breaks `pip install` there would
ship unnoticed. This compiles every unit CMakeLists.txt builds for those platforms (ours with
-Wall -Wextra -Werror, nanobind's as they come) against MLX's own wheels for them, links the
extension, and checks that every symbol left for the loader to find at import is one CPython
provides. Nothing is run: there is no arm64 machine here.

- macOS arm64: PyPI's `ziglang` (clang 22, macOS libc headers, a Mach-O linker), MLX's
  `mlx-metal` wheel (libmlx.dylib, headers), a stand-in Accelerate.h (.ci/macos_sdk/).
- Linux arm64: Debian's `g++-12-aarch64-linux-gnu`, MLX's `mlx-cpu` wheel, scipy-openblas32.
  Not zig: MLX's Linux wheel is built by GCC against libstdc++, and zig ships only LLVM's
  libc++, whose std:: names (std::__1::vector, ...) are not the ones libmlx.so exports.

    python3 .ci/cross_build.py [--only macos|linux] [-j N]

Needs llvm-nm, llvm-readobj and llvm-objdump (Debian's `llvm`) for the checks; run as root
on Debian (as CI is), it installs the Debian tools that are missing. Downloads are cached, by version, in build/cross/.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from platform import machine
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "cross"
CMAKE = (ROOT / "CMakeLists.txt").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()

# Each version has one home: MLX's and nanobind's in CMakeLists.txt, zig's (the test extra) and
# the macOS deployment target in pyproject.toml. Only the cross-only tools are pinned here.
MLX = re.search(r'set\(MFL_MLX_VERSION "([^"]+)"\)', CMAKE).group(1)
NANOBIND = re.search(r'set\(MFL_NANOBIND_VERSION "([^"]+)"\)', CMAKE).group(1)
ZIG = re.search(r'"ziglang==([^"]+)"', PYPROJECT).group(1)
MACOS = re.search(r'CMAKE_OSX_DEPLOYMENT_TARGET = "([^"]+)"', PYPROJECT).group(1)
OPENBLAS = "0.3.34.481.3"  # scipy-openblas32: its cblas.h and .so, to compile and link against
LINUX_GXX = "aarch64-linux-gnu-g++-12"  # Debian 12's cross GCC 12.2
# The wheels' platform tags (pip download takes exact tags only).
MACOS_WHEELS = ["macosx_14_0_arm64"]
LINUX_WHEELS = ["manylinux_2_35_aarch64", "manylinux_2_28_aarch64"]
PY = f"{sys.version_info.major}{sys.version_info.minor}"

# The flags CMake passes (a Release build of nanobind_add_module(... NOMINSIZE), as in
# build/*/build.ninja). -w: nanobind's warnings are nanobind's to fix.
COMMON = ["-O3", "-DNDEBUG", "-std=gnu++20", "-fPIC", "-fvisibility=hidden", "-fno-stack-protector"]
STRICT = ["-Wall", "-Wextra", "-Werror"]
EXT = [f'-DMFL_BUILT_AGAINST_MLX="{MLX}"', "-DNB_DOMAIN=mlx", *STRICT]
NANOBIND_UNITS = ["-DNB_BUILD", "-DNB_COMPACT_ASSERTIONS", "-fno-strict-aliasing", "-w"]

# libc++ and libc++abi names (namespaces std, std::__1 and __cxxabiv1, operator new/delete,
# __cxa_*, the personality routine). zig has no .tbd for libc++, so the macOS link leaves them
# to runtime lookup; on a Mac they bind to /usr/lib/libc++.1.dylib. That macOS 14's libc++ has
# them is what -D_LIBCPP_HAS_VENDOR_AVAILABILITY_ANNOTATIONS=1 checks, at compile time.
LIBCXX = re.compile(r"__Z(N|NK|T[IVST]N?)?St|__ZTVN10__cxxabiv1|__Z(nw|na|dl|da)|___cxa_|___gxx_personality_v0$")
ACCELERATE = {"_cblas_sgemm$NEWLAPACK"}  # what .ci/macos_sdk/Accelerate/Accelerate.h declares


class Unit(NamedTuple):
    library: str  # "_ext" or "forwarder"
    source: Path
    command: list


def fail(message):
    sys.exit(f"cross_build: {message}")


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode:
        fail(f"{' '.join(map(str, command))}\n{result.stdout}{result.stderr}")
    return result.stdout


def cmake_sources(command, target):
    """The .cpp files CMakeLists.txt gives a target: in the call that makes it, like
    `nanobind_add_module(_ext ... a.cpp b.cpp)`, and in any `target_sources(_ext ...)`."""
    calls = re.findall(rf"(?:{command}|target_sources)\(\s*{target}\s(.*?)\)", CMAKE, re.S)
    sources = [source for call in calls for source in re.findall(r"\S+\.cpp", call)]
    if not sources:
        fail(f"found no sources of {target} in CMakeLists.txt")
    return [ROOT / s for s in sources]


def nanobind_sources(nanobind):
    """The units of nanobind_build_library's add_library(...): nanobind's static library.

    (nb_ft.cpp, added apart from these, is only for free-threaded Pythons.)
    """
    config = (nanobind / "cmake" / "nanobind-config.cmake").read_text()
    call = re.search(r"add_library\(\$\{TARGET_NAME\}(.*?)\)", config, re.S).group(1)
    return [nanobind / "src" / f"{name}.cpp" for name in re.findall(r"\$\{NB_DIR\}/src/(\w+)\.cpp", call)]


def wheel(name, version, platforms):
    """Downloads and unpacks a wheel, once; returns the folder it is unpacked in."""
    folder = CACHE / f"{name}-{version}-{platforms[0]}"
    if (folder / ".unpacked").exists():
        return folder
    downloads = CACHE / "wheels"

    def downloaded():
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        return [w for w in downloads.glob(pattern) if any(p in w.name for p in platforms)]

    if not downloaded():
        tags = [arg for p in platforms for arg in ("--platform", p)]
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        run([*command, *tags, "-d", downloads, f"{name}=={version}"])
    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(downloaded()[0]) as zf:
        # mlx-metal's GPU kernels (mlx.metallib, the bulk of it) play no part in linking.
        zf.extractall(folder, [m for m in zf.namelist() if not m.endswith(".metallib")])
    (folder / ".unpacked").touch()
    return folder


def macos_python_headers():
    """This interpreter's headers, less pyconfig.h's POSIX/XOPEN feature macros.

    A Linux configure defines _POSIX_C_SOURCE and _XOPEN_SOURCE there, a macOS one does not:
    left in, they hide the BSD parts of macOS's libc headers that libc++ uses.
    """
    folder = CACHE / f"python{PY}-headers-macos"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(sysconfig.get_paths()["include"], folder)
    pyconfig = folder / "pyconfig.h"
    lines = pyconfig.read_text().splitlines()
    dropped = re.compile(r"#define (_POSIX_C_SOURCE|_XOPEN_SOURCE|_XOPEN_SOURCE_EXTENDED) ")
    pyconfig.write_text("\n".join(line for line in lines if not dropped.match(line)) + "\n")
    return folder


def zig_env():
    # zig caches what it builds (compiled units, libSystem stubs) here rather than in ~/.cache.
    return {**os.environ, "ZIG_GLOBAL_CACHE_DIR": str(CACHE / "zig"), "ZIG_LOCAL_CACHE_DIR": str(CACHE / "zig")}


class MacOS:
    """arm64 macOS: zig's clang and Mach-O linker against mlx-metal's libmlx.dylib."""

    name = "macos"

    def __init__(self, nanobind):
        self.nanobind = nanobind
        self.mlx = wheel("mlx-metal", MLX, MACOS_WHEELS) / "mlx"
        self.python = macos_python_headers()
        zig = [sys.executable, "-m", "ziglang"]
        self.cxx = [*zig, "c++", "-target", f"aarch64-macos.{MACOS}"]
        # `zig cc`, not `zig c++`: the latter would link zig's own static libc++ into the
        # extension instead of leaving libc++ to the system's, as Xcode does.
        self.linker = [*zig, "cc", "-target", f"aarch64-macos.{MACOS}"]
        # zig turns Apple's availability markup in libc++'s headers off. On, a libc++ feature
        # newer than the deployment target is a compile error, as it is with Xcode.
        self.flags = [
            "-U_LIBCPP_HAS_VENDOR_AVAILABILITY_ANNOTATIONS",
            "-D_LIBCPP_HAS_VENDOR_AVAILABILITY_ANNOTATIONS=1",
        ]
        # What MLX's CMake target adds on macOS (MLXConfig.cmake's MLX_CXX_FLAGS and includes).
        self.ext_flags = ["-DACCELERATE_NEW_LAPACK", "-D_METAL_", "-isystem", self.mlx / "include" / "metal_cpp"]
        self.ext_flags += ["-I", ROOT / ".ci" / "macos_sdk"]
        self.out = CACHE / "out" / self.name

    def units(self):
        return ext_units(self)

    def link(self, objects):
        """Links the extension; returns {library: what may be left to runtime lookup}."""
        ext = self.out / f"_ext.cpython-{PY}-darwin.so"
        # -undefined dynamic_lookup: zig's linker has no -U, so nanobind's
        # -Wl,@darwin-ld-cpython.sym (exactly CPython's names may stay undefined) is done by
        # check() after the link. zig's linker has no -bundle either: this makes an MH_DYLIB
        # where CMake makes an MH_BUNDLE; Python loads both alike. -fno-sanitize=undefined:
        # zig would link (and first build) its UBSan runtime, which a real build has not.
        flags = ["-shared", "-undefined", "dynamic_lookup", "-Wl,-dead_strip", "-Wl,-rpath,@loader_path/../mlx/lib"]
        flags += ["-fno-sanitize=undefined"]
        run([*self.linker, *flags, "-o", ext, *objects["_ext"], self.mlx / "lib" / "libmlx.dylib"], env=zig_env())
        return {ext: "CPython"}

    def check(self, library, allowed):
        # `(undefined) external NAME (from LIB)`; without `(from ...)`: left to runtime lookup.
        undefined = [line.split() for line in run(["llvm-nm", "-m", library]).splitlines() if "(undefined)" in line]
        bound = [u[2] for u in undefined if "(from" in u]
        lookup = {u[2] for u in undefined if "(from" not in u}
        expected = cpython_names(self.nanobind)
        unexpected = {s for s in lookup if s not in expected and not LIBCXX.match(s) and s not in ACCELERATE}
        exported = run(["llvm-nm", "-g", "--defined-only", "--format=just-symbols", library]).split()
        minos, mlx_minos = minimum_macos(library), minimum_macos(self.mlx / "lib" / "libmlx.dylib")
        if minos != MACOS:
            fail(f"{library.name} is built for macOS {minos}, not {MACOS}")
        if version(mlx_minos) > version(MACOS):  # what Apple's linker warns about
            fail(f"libmlx.dylib needs macOS {mlx_minos}, the extension targets {MACOS} (pyproject.toml)")
        report(self, library, unexpected, "_PyInit__ext" in exported)
        libcxx = sum(1 for s in lookup if LIBCXX.match(s))
        return (
            f"Mach-O arm64, minos {minos}; {len(bound)} symbols bound to libmlx and libSystem, "
            f"{len(lookup)} left to runtime lookup: {len(lookup & expected)} CPython's, {libcxx} libc++'s, "
            f"{len(lookup & ACCELERATE)} Accelerate's"
        )


class Linux:
    """arm64 Linux: Debian's cross GCC against mlx-cpu's libmlx.so and scipy-openblas32."""

    name = "linux"

    def __init__(self, nanobind):
        self.nanobind = nanobind
        self.mlx = wheel("mlx-cpu", MLX, LINUX_WHEELS) / "mlx"
        self.openblas = wheel("scipy-openblas32", OPENBLAS, LINUX_WHEELS) / "scipy_openblas32"
        # This interpreter's x86-64 headers: aarch64 Linux has the same type sizes (both LP64).
        self.python = Path(sysconfig.get_paths()["include"])
        self.cxx = self.linker = [LINUX_GXX]
        self.flags = ["-ffunction-sections", "-fdata-sections"]  # nanobind's, off Apple
        self.ext_flags = ["-isystem", self.openblas / "include"]
        self.out = CACHE / "out" / self.name

    def units(self):
        # The CBLAS forwarder fast_blas loads: its own CMake target, Linux only.
        forwarder = [*self.cxx, *COMMON, *self.flags, "-O2", *STRICT, *self.ext_flags]
        forwarder += ['-DMFL_OPENBLAS_SONAME="libscipy_openblas.so"']
        sources = cmake_sources("add_library", "mlx_fused_lora_blas")
        return ext_units(self) + [Unit("forwarder", src, forwarder) for src in sources]

    def link(self, objects):
        ext = self.out / f"_ext.cpython-{PY}-aarch64-linux-gnu.so"
        forwarder = self.out / "libmlx_fused_lora_blas.so"
        # libmlx.so needs the BLAS and LAPACK auditwheel put beside it, in mlx_cpu.libs.
        flags = ["-shared", "-Wl,--gc-sections", f"-Wl,-rpath-link,{self.mlx.parent / 'mlx_cpu.libs'}"]
        libraries = [self.mlx / "lib" / "libmlx.so", "-L", self.openblas / "lib", "-lscipy_openblas"]
        run([*self.linker, *flags, "-o", ext, *objects["_ext"], *libraries])
        run([*self.linker, *flags, "-o", forwarder, *objects["forwarder"], "-ldl"])
        return {ext: "CPython", forwarder: "nothing"}

    def check(self, library, allowed):
        def names(*options, path=library):
            symbols = run(["llvm-nm", "-D", "--format=just-symbols", *options, path]).split()
            return {s.split("@")[0] for s in symbols}  # without the version (memcpy@GLIBC_2.17)

        needed = re.findall(r"^\s+(\S+\.so\S*)$", run(["llvm-readobj", "--needed-libs", library]), re.M)
        provided = set().union(*(names("--defined-only", path=self.locate(n)) for n in needed))
        # `U name`; weak references (`w name`) may stay unresolved.
        undefined = {
            line.split()[1].split("@")[0]
            for line in run(["llvm-nm", "-D", "--undefined-only", library]).splitlines()
            if line.split()[0] == "U"
        }
        bound, lookup = undefined & provided, undefined - provided
        # ELF names have no leading underscore; nanobind's list is of Mach-O names.
        expected = {s[1:] for s in cpython_names(self.nanobind)} if allowed == "CPython" else set()
        exports_init = "PyInit__ext" in names("--defined-only")
        report(self, library, lookup - expected, exports_init or allowed != "CPython")
        left = f"{len(lookup)} left to runtime lookup, all CPython's" if lookup else "none left to runtime lookup"
        return f"ELF aarch64; {len(bound)} symbols bound to {', '.join(needed)}, {left}"

    def locate(self, name):
        for folder in (self.mlx / "lib", self.openblas / "lib"):
            if (folder / name).exists():
                return folder / name
        path = run([LINUX_GXX, f"-print-file-name={name}"]).strip()  # the cross sysroot's
        if path == name:
            fail(f"cannot find {name}, which a linked library needs")
        return path


def ext_units(platform):
    """The extension's units: ours (CMakeLists.txt's list for _ext, strict) and nanobind's."""
    includes = ["-isystem", platform.python, "-isystem", platform.nanobind / "include"]
    ours = [*platform.cxx, *COMMON, *platform.flags, *EXT, *platform.ext_flags, "-I", ROOT / "csrc"]
    ours += [*includes, "-isystem", platform.mlx / "include"]
    robin_map = platform.nanobind / "ext" / "robin_map" / "include"
    theirs = [*platform.cxx, *COMMON, *platform.flags, *NANOBIND_UNITS, *includes, "-isystem", robin_map]
    return [Unit("_ext", src, ours) for src in cmake_sources("nanobind_add_module", "_ext")] + [
        Unit("_ext", src, theirs) for src in nanobind_sources(platform.nanobind)
    ]


def minimum_macos(library):
    return re.search(r"minos (\S+)", run(["llvm-objdump", "--macho", "--private-headers", library])).group(1)


def version(text):
    return tuple(int(part) for part in text.split("."))


def cpython_names(nanobind):
    """CPython's API, as nanobind lists it for Apple's linker (`-U _Py...` lines)."""
    lines = (nanobind / "cmake" / "darwin-ld-cpython.sym").read_text().splitlines()
    return {line.split()[1] for line in lines if line.startswith("-U ")}


def report(platform, library, unexpected, exports_init):
    if unexpected:
        listed = "\n  ".join(sorted(unexpected))
        fail(f"{platform.name}: {library.name} leaves symbols that nothing will provide to runtime lookup:\n  {listed}")
    if not exports_init:
        fail(f"{platform.name}: {library.name} does not export PyInit__ext")


def compile_all(platforms, jobs):
    """Compiles every unit of every platform in one pool; returns {platform: {library: objects}}."""
    tasks = []
    for platform in platforms:
        shutil.rmtree(platform.out, ignore_errors=True)
        platform.out.mkdir(parents=True)
        for unit in platform.units():
            tasks.append((platform, unit, platform.out / f"{unit.source.parent.name}_{unit.source.stem}.o"))
    tasks.sort(key=lambda task: task[0].nanobind in task[1].source.parents)  # ours first: the slow ones

    def compile_one(task):
        platform, unit, obj = task
        command = [str(c) for c in [*unit.command, "-c", unit.source, "-o", obj]]
        return subprocess.run(command, capture_output=True, text=True, env=zig_env())

    failures = []
    with ThreadPoolExecutor(jobs) as pool:
        for (platform, unit, _), result in zip(tasks, pool.map(compile_one, tasks), strict=True):
            if result.returncode:
                where = unit.source.relative_to(ROOT) if ROOT in unit.source.parents else unit.source.name
                failures.append(f"--- {platform.name} arm64: {where}\n{result.stdout}{result.stderr}")
    if failures:
        print("\n".join(failures))
        fail(f"{len(failures)} of {len(tasks)} units failed to compile")
    objects = {platform: {} for platform in platforms}
    for platform, unit, obj in tasks:
        objects[platform].setdefault(unit.library, []).append(obj)
    return objects, len(tasks)


def debian_packages(names) -> list:
    """The Debian packages of the tools this machine lacks for ``names``."""
    missing = []
    if "linux" in names and shutil.which(LINUX_GXX) is None:
        missing.append("g++-12-aarch64-linux-gnu")
    if any(shutil.which(tool) is None for tool in ("llvm-nm", "llvm-readobj", "llvm-objdump")):
        missing.append("llvm")
    return missing


def check_tools(names):
    # The Debian tools are installed here, where missing, when this runs as root on Debian (CI
    # does): the test command stays one line, and a developer's machine is never changed
    # behind their back (without root the message says what to install).
    missing = debian_packages(names)
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"cross_build: installing {' '.join(missing)} (apt-get)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)
        missing = debian_packages(names)
    if missing:
        fail(f"needs the Debian packages {' '.join(missing)}: apt-get install {' '.join(missing)}")
    if "macos" in names:
        try:
            found = metadata.version("ziglang")
        except metadata.PackageNotFoundError:
            found = "none"
        if found != ZIG:
            fail(f"needs ziglang=={ZIG} (pip install -e '.[test]'), found {found}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["macos", "linux"], help="one platform (default: both)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    args = parser.parse_args()
    names = [args.only] if args.only else ["macos", "linux"]
    if sys.platform != "linux" or machine() != "x86_64":
        # The recipe is x86-64 Linux's (Debian's cross GCC, zig's x86-64 wheel); elsewhere the
        # README's test command still runs, and the native build is the one `pip install` made.
        print(f"cross_build: skipped on {sys.platform} {machine()}: the cross builds run on x86-64 Linux (CI)")
        return
    check_tools(names)
    start = time.monotonic()
    nanobind = wheel("nanobind", NANOBIND, ["any"]) / "nanobind"
    platforms = [{"macos": MacOS, "linux": Linux}[name](nanobind) for name in names]
    print(f"cross_build: MLX {MLX}, nanobind {NANOBIND}: wheels ready after {time.monotonic() - start:.0f} s")
    objects, count = compile_all(platforms, args.jobs)
    print(f"cross_build: {count} units compiled after {time.monotonic() - start:.0f} s", flush=True)
    for platform in platforms:
        for library, allowed in platform.link(objects[platform]).items():
            print(f"cross_build: {platform.name} arm64: {library.name}: {platform.check(library, allowed)}")
    print(f"cross_build: passed in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
