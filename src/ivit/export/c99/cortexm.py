"""Build and run a generated C library bare-metal on an emulated Cortex-M3 (no FPU).

Tools (Debian): ``apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm``.

* ``compile_model`` compiles ``model.c``/``model_weights.c`` with ``arm-none-eabi-gcc -mcpu=cortex-m3
  -mthumb -mfloat-abi=soft`` and the strict flags; ``soft_float_symbols`` lists the soft-float helpers
  (``__aeabi_f*``, ``__aeabi_d*``, int <-> float conversions, libgcc's ``__addsf3``-style names) that
  ``arm-none-eabi-nm`` finds in objects: none may appear in the model's.
* ``build_app`` links a bare-metal program for the ARM MPS2 AN385 board (QEMU ``mps2-an385``): a
  startup file with the vector table, a linker script for the board's memory map (code and constants
  in ZBT SSRAM1 at 0x0, 4 MiB, the "flash"; data, stack and the arena in ZBT SSRAM2/3 at 0x20000000,
  4 MiB; an arena too big for it goes to the 16 MiB PSRAM at 0x21000000), the test images as
  ``const`` arrays, and a main that runs ``ivit_run`` on each and prints the logits over semihosting
  (newlib's ``--specs=rdimon.specs``).
* ``run_app`` runs it with ``qemu-system-arm -M mps2-an385 -cpu cortex-m3 -nographic -semihosting``
  (a timeout bounds it).  With ``icount=True`` QEMU runs with ``-icount shift=0``: virtual time advances
  exactly 1 ns per executed instruction, so the board's CMSDK APB timer 0 (25 MHz, 32-bit) read around
  each ``ivit_run`` call counts ``instructions / 40``.  A loop of a known instruction count calibrates
  (checks) that factor in every run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...errors import IvitError
from .host import STRICT_FLAGS, compile_c

__all__ = ["ARM_FLAGS", "arm_tools", "missing_tools", "compile_model", "soft_float_symbols", "section_sizes",
           "build_app", "run_app", "run_images", "CortexMRun", "FLASH_BYTES", "SRAM_BYTES", "PSRAM_BYTES",
           "INSNS_PER_TICK", "STARTUP_C", "LINKER_SCRIPT"]

ARM_FLAGS = ("-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft")
#: AN385 memories (ARM AN385 / QEMU hw/arm/mps2.c): ZBT SSRAM1 (code), ZBT SSRAM2/3 (data), PSRAM
FLASH_BYTES = 4 << 20
SRAM_BYTES = 4 << 20
PSRAM_BYTES = 16 << 20
#: -icount shift=0: 1 ns of virtual time per instruction; APB timer at 25 MHz -> 40 instructions per tick
INSNS_PER_TICK = 40
_CAL_ITERS = 200_000  # calibration loop: 2 instructions (subs, bne) per iteration
_TOOLS = {"gcc": "arm-none-eabi-gcc", "nm": "arm-none-eabi-nm", "size": "arm-none-eabi-size",
          "qemu": "qemu-system-arm"}
#: soft-float helpers of the ARM EABI and libgcc
_SOFT_FLOAT = re.compile(r"^(__aeabi_[fd]\w*|__aeabi_c[fd]\w*|__aeabi_\w*2[fd]|"
                         r"__(add|sub|mul|div|neg|cmp|eq|ne|lt|le|gt|ge|unord|pow)[sdtx]f\d|"
                         r"__(float|fix|extend|trunc)\w*)$")


def arm_tools() -> dict[str, str] | None:
    """Paths of arm-none-eabi-gcc/nm/size and qemu-system-arm (and newlib's rdimon specs), or None."""
    paths = {k: shutil.which(v) for k, v in _TOOLS.items()}
    if any(p is None for p in paths.values()):
        return None
    return paths  # type: ignore[return-value]


def missing_tools() -> list[str]:
    """Names of the missing tools (empty when the Cortex-M3 run can work); checks newlib too."""
    miss = [v for v in _TOOLS.values() if shutil.which(v) is None]
    gcc = shutil.which(_TOOLS["gcc"])
    if gcc is not None:
        r = subprocess.run([gcc, *ARM_FLAGS, "-print-file-name=librdimon.a"], capture_output=True, text=True)
        if r.returncode != 0 or not Path(r.stdout.strip()).is_file():
            miss.append("libnewlib-arm-none-eabi (librdimon.a)")
    return miss


def _tools() -> dict[str, str]:
    t = arm_tools()
    if t is None:
        raise IvitError("the Cortex-M3 build needs " + ", ".join(missing_tools()) +
                        " (apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")
    return t


def compile_model(module_dir: Path, opt: str = "-O2") -> list[Path]:
    """``model.c`` and ``model_weights.c`` compiled for the Cortex-M3 (strict flags, soft float ABI)."""
    gcc = _tools()["gcc"]
    flags = [f for f in STRICT_FLAGS if f != "-O2"] + [opt, *ARM_FLAGS, "-ffunction-sections", "-fdata-sections"]
    hdr = sorted(Path(module_dir).glob("*.h"))
    return [compile_c(gcc, Path(module_dir) / n, flags, hdr) for n in ("model.c", "model_weights.c")]


def soft_float_symbols(objects: Sequence[Path]) -> list[str]:
    """Soft-float helpers referenced or defined by ``objects`` (``arm-none-eabi-nm``)."""
    nm = _tools()["nm"]
    found: set[str] = set()
    for o in objects:
        r = subprocess.run([nm, str(o)], capture_output=True, text=True)
        if r.returncode != 0:
            raise IvitError(f"arm-none-eabi-nm failed on {o}: {r.stderr.strip()[:200]}")
        for line in r.stdout.splitlines():
            sym = line.split()[-1] if line.split() else ""
            if _SOFT_FLOAT.match(sym):
                found.add(sym)
    return sorted(found)


def undefined_symbols(objects: Sequence[Path]) -> list[str]:
    nm = _tools()["nm"]
    out: set[str] = set()
    for o in objects:
        r = subprocess.run([nm, "-u", str(o)], capture_output=True, text=True)
        out.update(ln.split()[-1] for ln in r.stdout.splitlines() if ln.strip())
    return sorted(out)


def section_sizes(objects: Sequence[Path]) -> dict[str, int]:
    """``{"text": code + read-only data, "data": ..., "bss": ...}`` summed over ``objects`` (Berkeley format)."""
    size = _tools()["size"]
    r = subprocess.run([size, "-B", *map(str, objects)], capture_output=True, text=True)
    if r.returncode != 0:
        raise IvitError(f"arm-none-eabi-size failed: {r.stderr.strip()[:200]}")
    tot = {"text": 0, "data": 0, "bss": 0}
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            tot["text"] += int(parts[0])
            tot["data"] += int(parts[1])
            tot["bss"] += int(parts[2])
    return tot


STARTUP_C = r"""
/* Startup of the bare-metal test program (ARM MPS2 AN385, Cortex-M3): vector table, reset handler
 * (copy .data, zero .bss, open the semihosting console, run main, exit), fault handler. */
#include <stdint.h>
#include <unistd.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);
extern void initialise_monitor_handles(void);
extern void _exit(int);

void _init(void) {}
void _fini(void) {}

void Reset_Handler(void) {
    uint32_t *src = &_sidata, *dst = &_sdata;
    while (dst < &_edata) *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss; dst++) *dst = 0;
    initialise_monitor_handles();
    _exit(main());
}

void Fault_Handler(void) {
    static const char msg[] = "IVIT_FAULT\n";
    write(1, msg, sizeof msg - 1);
    _exit(3);
}

__attribute__((section(".isr_vector"), used)) void (*const ivit_vectors[16])(void) = {
    (void (*)(void))(&_estack), Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, Fault_Handler,
};
"""

LINKER_SCRIPT = """
/* ARM MPS2 AN385 (QEMU mps2-an385): ZBT SSRAM1 4 MiB at 0x0 holds code and constants (the flash of a
 * real part), ZBT SSRAM2/3 4 MiB at 0x20000000 data, bss and stack, PSRAM 16 MiB at 0x21000000 big arenas. */
ENTRY(Reset_Handler)
MEMORY {
    FLASH (rx)  : ORIGIN = 0x00000000, LENGTH = 4M
    SRAM  (rwx) : ORIGIN = 0x20000000, LENGTH = 4M
    PSRAM (rwx) : ORIGIN = 0x21000000, LENGTH = 16M
}
SECTIONS {
    .isr_vector : { KEEP(*(.isr_vector)) } > FLASH
    .text : { *(.text*) *(.rodata*) KEEP(*(.init)) KEEP(*(.fini)) . = ALIGN(8); } > FLASH
    .ARM.exidx : { *(.ARM.exidx*) } > FLASH
    .init_array : { KEEP(*(.init_array*)) } > FLASH
    .fini_array : { KEEP(*(.fini_array*)) } > FLASH
    _sidata = LOADADDR(.data);
    .data : { _sdata = .; *(.data*) . = ALIGN(8); _edata = .; } > SRAM AT > FLASH
    .bss (NOLOAD) : { _sbss = .; *(.bss*) *(COMMON) . = ALIGN(8); _ebss = .; } > SRAM
    .psram (NOLOAD) : { *(.psram*) } > PSRAM
    end = _ebss;
    __end__ = _ebss;
    _estack = ORIGIN(SRAM) + LENGTH(SRAM);
}
"""

_APP_C = r"""
/* Runs ivit_run on each embedded image and prints, over semihosting:
 *   CAL <ticks of a loop of CAL_INSNS instructions>
 *   R <call> <return code> <APB timer ticks of the call> <logits...>
 * with the board's CMSDK APB timer 0 (25 MHz down-counter). */
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include "model.h"
#include "images.h"

#define TIMER0_CTRL (*(volatile uint32_t *)0x40000000u)
#define TIMER0_VALUE (*(volatile uint32_t *)0x40000004u)
#define TIMER0_RELOAD (*(volatile uint32_t *)0x40000008u)

static uint64_t arena[(IVIT_ARENA_BYTES + 7) / 8] ARENA_ATTR;
static int32_t logits[IVIT_BATCH * IVIT_OUTPUT_SIZE];
static char line[64 + 12 * IVIT_BATCH * IVIT_OUTPUT_SIZE];

static char *put_int(char *p, long long v) {
    char tmp[24];
    int n = 0;
    unsigned long long u = v < 0 ? (unsigned long long)(-(v + 1)) + 1u : (unsigned long long)v;
    if (v < 0) *p++ = '-';
    do {
        tmp[n++] = (char)('0' + (int)(u % 10u));
        u /= 10u;
    } while (u != 0u);
    while (n > 0) *p++ = tmp[--n];
    return p;
}

static void spin(uint32_t n) { __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(n) : : "cc"); }

int main(void) {
    uint32_t t0, t1;
    int i, j;
    char *p;
    TIMER0_CTRL = 0u;
    TIMER0_RELOAD = 0xFFFFFFFFu;
    TIMER0_VALUE = 0xFFFFFFFFu;
    TIMER0_CTRL = 1u;
    t0 = TIMER0_VALUE;
    spin(CAL_ITERS);
    t1 = TIMER0_VALUE;
    p = line;
    memcpy(p, "CAL ", 4);
    p = put_int(p + 4, (long long)(t0 - t1));
    *p++ = '\n';
    write(1, line, (size_t)(p - line));
    for (i = 0; i < N_CALLS; i++) {
        int rc;
        t0 = TIMER0_VALUE;
        rc = ivit_run(ivit_images[i], logits, arena);
        t1 = TIMER0_VALUE;
        p = line;
        *p++ = 'R';
        *p++ = ' ';
        p = put_int(p, i);
        *p++ = ' ';
        p = put_int(p, rc);
        *p++ = ' ';
        p = put_int(p, (long long)(t0 - t1));
        for (j = 0; j < IVIT_BATCH * IVIT_OUTPUT_SIZE; j++) {
            *p++ = ' ';
            p = put_int(p, logits[j]);
        }
        *p++ = '\n';
        write(1, line, (size_t)(p - line));
    }
    write(1, "IVIT_END\n", 9);
    return 0;
}
"""


def _images_h(pixels: Tensor, per_call: int) -> str:
    flat = pixels.contiguous().reshape(-1, per_call).tolist()
    lines = [f"#define N_CALLS {len(flat)}", f"static const uint8_t ivit_images[N_CALLS][{per_call}] = {{"]
    for row in flat:
        lines.append("    {" + ",".join(map(str, row)) + "},")
    lines.append("};")
    return "\n".join(lines) + "\n"


def _define(text: str, name: str) -> int:
    m = re.search(rf"#define\s+{name}\s+(\d+)", text)
    if not m:
        raise IvitError(f"model.h has no {name}")
    return int(m.group(1))


def build_app(module_dir: Path, pixels: Tensor, work: Path, opt: str = "-O2") -> Path:
    """Link ``work/app.elf``: the model, the startup, the linker script and ``pixels`` (N, C, H, W uint8,
    N a multiple of the export's batch) as const arrays.  Refuses (with the numbers) what does not fit."""
    tools = _tools()
    module_dir, work = Path(module_dir), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    hdr_text = (module_dir / "model.h").read_text()
    per_call = _define(hdr_text, "IVIT_INPUT_BYTES")
    arena = _define(hdr_text, "IVIT_ARENA_BYTES")
    if pixels.dtype != torch.uint8 or pixels.numel() % per_call:
        raise IvitError(f"pixels must be uint8 in calls of {per_call} bytes")
    objs = compile_model(module_dir, opt)
    flash = section_sizes(objs)["text"] + pixels.numel()
    if flash > FLASH_BYTES - (64 << 10):
        raise IvitError(f"model code and constants ({flash} bytes with the test images) do not fit the AN385's "
                        f"{FLASH_BYTES} bytes of code memory")
    if arena > PSRAM_BYTES:
        raise IvitError(f"the arena ({arena} bytes) does not fit the AN385's {PSRAM_BYTES} bytes of PSRAM")
    attr = '__attribute__((section(".psram")))' if arena > SRAM_BYTES - (512 << 10) else ""
    (work / "startup.c").write_text(STARTUP_C)
    (work / "mps2_an385.ld").write_text(LINKER_SCRIPT)
    (work / "app.c").write_text(_APP_C)
    (work / "images.h").write_text(_images_h(pixels, per_call))
    shutil.copy(module_dir / "model.h", work / "model.h")
    gcc = tools["gcc"]
    base = [*ARM_FLAGS, opt, "-std=gnu99", "-Wall", "-Wextra", "-Werror", "-ffunction-sections", "-fdata-sections"]
    app_objs = []
    for name, extra in (("startup.c", []), ("app.c", [f"-DARENA_ATTR={attr}", f"-DCAL_ITERS={_CAL_ITERS}u"])):
        o = work / (name[:-2] + ".o")
        r = subprocess.run([gcc, *base, *extra, "-I", str(work), "-c", str(work / name), "-o", str(o)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise IvitError(f"arm-none-eabi-gcc failed on {name}: {(r.stderr or r.stdout).strip()[:400]}")
        app_objs.append(o)
    elf = work / "app.elf"
    r = subprocess.run([gcc, *ARM_FLAGS, "--specs=rdimon.specs", "-nostartfiles", "-T", str(work / "mps2_an385.ld"),
                        "-Wl,--gc-sections", *map(str, app_objs), *map(str, objs), "-o", str(elf)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise IvitError(f"linking app.elf failed: {(r.stderr or r.stdout).strip()[:400]}")
    return elf


@dataclass
class CortexMRun:
    """Results of one emulator run: logits (N, K), ticks per call, the calibration and the raw output."""

    logits: Tensor
    ticks: list[int]
    cal_ticks: int
    icount: bool
    output: str = ""
    seconds: float = 0.0
    insns_per_tick: float = field(default=float(INSNS_PER_TICK))

    @property
    def calibrated_insns_per_tick(self) -> float:
        """Instructions per timer tick measured with the calibration loop (about 40 with -icount shift=0)."""
        return 2 * _CAL_ITERS / max(self.cal_ticks, 1)

    def instructions(self, batch: int = 1) -> list[int]:
        """Instructions executed per image (``-icount shift=0``: 40 per APB timer tick)."""
        return [t * INSNS_PER_TICK // batch for t in self.ticks]


def run_app(elf: Path, timeout: float = 600, icount: bool = True) -> str:
    """Run ``elf`` under ``qemu-system-arm -M mps2-an385 -cpu cortex-m3``; returns its semihosting output."""
    qemu = _tools()["qemu"]
    cmd = [qemu, "-M", "mps2-an385", "-cpu", "cortex-m3", "-nographic", "-monitor", "none", "-serial", "none",
           "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]
    if icount:
        cmd[1:1] = ["-icount", "shift=0"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise IvitError(f"QEMU did not finish within {timeout:.0f} s") from None
    out = r.stdout + r.stderr
    if "IVIT_FAULT" in out:
        raise IvitError("the Cortex-M3 program faulted (HardFault)")
    if "IVIT_END" not in out:
        raise IvitError(f"QEMU exited ({r.returncode}) before the program finished: {out.strip()[-300:]}")
    return out


def run_images(module_dir: Path, pixels: Tensor, work: Path, timeout: float = 600, icount: bool = True,
               opt: str = "-O2") -> CortexMRun:
    """Build the app for ``pixels`` and run it in QEMU; returns logits (N, K) and the timer ticks per call."""
    import time

    elf = build_app(module_dir, pixels, work, opt)
    t0 = time.perf_counter()
    out = run_app(elf, timeout, icount)
    secs = time.perf_counter() - t0
    rows, ticks, cal = [], [], 0
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["CAL"]:
            cal = int(parts[1])
        elif parts[:1] == ["R"]:
            if int(parts[2]) != 0:
                raise IvitError(f"ivit_run returned {parts[2]} on the Cortex-M3")
            ticks.append(int(parts[3]))
            rows.append([int(v) for v in parts[4:]])
    logits = torch.tensor(rows, dtype=torch.int32).reshape(pixels.shape[0], -1)
    return CortexMRun(logits=logits, ticks=ticks, cal_ticks=cal, icount=icount, output=out, seconds=secs)
