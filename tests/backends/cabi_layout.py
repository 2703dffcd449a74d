"""The ctypes mirrors of flashmux_cuda.h's argument structs (FmxAttnArgs, FmxDecodeArgs) against
the C header, for test_cuda_build.py and test_cuda_decode_abi.py: a C program generated from the
mirror's fields prints offsetof for each of them and the struct's sizeof; compiled with cc."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path


def assert_layout(tmp_path: Path, header: Path, struct, extra: str = "") -> dict[str, int]:
    """Every field of the ctypes `struct` sits at the offset of the C struct of the same name
    (the header's typedef), and the sizes agree. `extra`: C statements printing more "name
    value" lines. -> all the printed values by name."""
    name = struct.__name__
    lines = [f'printf("{f} %zu\\n", offsetof({name}, {f}));' for f, _ in struct._fields_]
    lines += [f'printf("sizeof %zu\\n", sizeof({name}));', extra]
    src = ("#include <stddef.h>\n#include <stdio.h>\n" f'#include "{header.name}"\n'
           "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    (tmp_path / "layout.c").write_text(src)
    exe = tmp_path / "layout"
    subprocess.run(["cc", f"-I{header.parent}", str(tmp_path / "layout.c"), "-o", str(exe)],
                   check=True)
    rows = {n: int(v) for n, v in (line.split() for line in
                                   subprocess.check_output([str(exe)], text=True).splitlines())}
    for f, _ in struct._fields_:
        assert rows[f] == getattr(struct, f).offset, f
    assert rows["sizeof"] == ctypes.sizeof(struct)
    return rows
