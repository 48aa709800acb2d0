"""What a guest that stopped answering the probe channel is doing.

When the probe misses a deadline, "timed out" alone cannot tell a hung guest
from a busy one.  :func:`snapshot` asks its QEMU, over QMP, for the run state,
each vCPU's KVM counters twice :data:`SAMPLE_S` apart (``query-stats``: exits,
halt exits, page faults per second), each vCPU's instruction pointer and its
local APIC's pending and in-service vectors, so the row can say e.g. "vCPU0
halted, 0 exits/s" (the guest idles: the probe is blocked), "vCPU1 halted, IRR
34" (an interrupt is pending but the vCPU was never woken) or "vCPU0 in user
space, 40000 pf/s" (the write loop is in a fault storm and the control thread
never ran).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Dict, List, Optional

from harness.errors import QEMUError
from harness.qemu.machine import VM

log = logging.getLogger(__name__)

#: seconds between the two counter samples (long enough for a busy vCPU to show
#: thousands of exits, short next to the 10-60 s deadline it explains)
SAMPLE_S = 1.0
#: seconds for each QMP command (a wedged QEMU must not add a minute)
QMP_TIMEOUT = 5.0
#: KVM vCPU stats worth a rate (all are cumulative counters in query-stats)
RATES = ("exits", "halt_exits", "pf_taken", "pf_fixed", "io_exits", "irq_injections", "nmi_injections")

_RIP = re.compile(r"\bRIP=([0-9a-f]{16})")
_HLT = re.compile(r"\bHLT=(\d)")
_CPL = re.compile(r"\bCPL=(\d)")
#: where a reset x86 vCPU starts (CS base 0xffff0000, IP 0xfff0)
RESET_RIP = 0xfff0
#: HMP register text kept in the sidecar, characters
REGISTERS_KEEP = 8192
_CPU = re.compile(r"^CPU#(\d+)", re.M)
#: HMP ``info lapic N`` lines: ``ISR\t 34 236(level) `` or ``IRR\t (none)``
_APIC_VECTORS = re.compile(r"^(ISR|IRR)\t\s*(.*?)\s*$", re.M)
#: HMP ``info lapic`` text kept in the sidecar per vCPU, characters
LAPIC_KEEP = 2048


def _natural(path: str) -> List[Any]:
    """Sort key: ``device[10]`` after ``device[9]`` (vCPUs in index order)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


async def _vcpu_stats(vm: VM) -> Dict[str, Dict[str, int]]:
    """{qom-path: {stat: value}} of the KVM vCPU counters (empty under TCG)."""
    reply = await vm.cmd("query-stats", {"target": "vcpu", "providers": [{"provider": "kvm", "names": list(RATES)}]},
                         timeout=QMP_TIMEOUT)
    out: Dict[str, Dict[str, int]] = {}
    for entry in reply or []:
        out[str(entry.get("qom-path", "?"))] = {s["name"]: int(s["value"]) for s in entry.get("stats", [])
                                               if isinstance(s.get("value"), int)}
    return out


def parse_registers(text: str) -> List[Dict[str, Any]]:
    """Per vCPU ``rip`` and ``halted`` from HMP ``info registers -a`` (QMP has no
    equivalent); vCPUs in order."""
    cpus: List[Dict[str, Any]] = []
    starts = [m.start() for m in _CPU.finditer(text)] or [0]
    for i, start in enumerate(starts):
        block = text[start:starts[i + 1] if i + 1 < len(starts) else len(text)]
        rip, hlt, cpl = _RIP.search(block), _HLT.search(block), _CPL.search(block)
        if rip:
            cpus.append({"rip": f"0x{rip.group(1)}", "halted": bool(hlt and hlt.group(1) == "1"),
                         "cpl": int(cpl.group(1)) if cpl else None})
    return cpus


def parse_lapic(text: str) -> Dict[str, List[int]]:
    """``{"isr": [...], "irr": [...]}``: the in-service and pending vectors of
    one local APIC from HMP ``info lapic N`` (``(level)`` marks dropped)."""
    out: Dict[str, List[int]] = {"isr": [], "irr": []}
    for m in _APIC_VECTORS.finditer(text.replace("\r", "")):
        out[m.group(1).lower()] = [int(t) for t in re.findall(r"\d+", m.group(2))]
    return out


async def snapshot(vm: VM) -> Dict[str, Any]:
    """Best effort: every part that QEMU cannot give is left out and logged."""
    snap: Dict[str, Any] = {}
    try:
        snap["status"] = (await vm.cmd("query-status", timeout=QMP_TIMEOUT)).get("status")
    except QEMUError as exc:
        log.warning("snapshot of %s: no status: %s", vm.name, exc)
        snap["incomplete"] = str(exc)
        return snap                     # a QEMU that cannot say its status will not say more
    try:
        first = await _vcpu_stats(vm)
        if first:                       # KVM: per-second rates
            await asyncio.sleep(SAMPLE_S)
            second = await _vcpu_stats(vm)
            snap["per_s"] = {path: {k: round((v - first.get(path, {}).get(k, v)) / SAMPLE_S)
                                    for k, v in stats.items()}
                             for path, stats in sorted(second.items(), key=lambda kv: _natural(kv[0]))}
    except QEMUError as exc:
        log.info("snapshot of %s: no KVM stats: %s", vm.name, exc)
    try:
        text = await vm.cmd("human-monitor-command", {"command-line": "info registers -a"}, timeout=QMP_TIMEOUT)
        snap["vcpus"] = parse_registers(str(text))
        snap["registers"] = str(text)[:REGISTERS_KEEP]
    except QEMUError as exc:
        log.warning("snapshot of %s: no registers: %s", vm.name, exc)
        snap["incomplete"] = str(exc)
    # each local APIC (KVM_GET_LAPIC under KVM): an interrupt pending (IRR) on a
    # halted vCPU is a lost wake-up; one stuck in service (ISR) blocks lower ones
    lapics: List[Dict[str, Any]] = []
    for i in range(len(snap.get("vcpus") or [])):
        try:
            text = str(await vm.cmd("human-monitor-command", {"command-line": f"info lapic {i}"},
                                    timeout=QMP_TIMEOUT))
        except QEMUError as exc:
            log.warning("snapshot of %s: no local APIC %d: %s", vm.name, i, exc)
            break
        lapics.append({**parse_lapic(text), "text": text[:LAPIC_KEEP]})
    if lapics:
        snap["lapic"] = lapics
    return snap


def summary(snap: Dict[str, Any]) -> str:
    """One line for a row's error: run state and, per vCPU, where it is and how busy."""
    parts: List[str] = []
    if snap.get("status"):
        parts.append(f"QEMU {snap['status']}")
    rates = list((snap.get("per_s") or {}).values())
    lapics = snap.get("lapic") or []
    for i, cpu in enumerate(snap.get("vcpus") or []):
        rip = int(cpu["rip"], 16)
        if rip == RESET_RIP:
            where = "at the reset vector (reset since it last ran the guest's code)"
        elif cpu["halted"]:
            where = "halted"
        else:
            where = {0: "in the kernel", 3: "in user space"}.get(cpu.get("cpl"), "running")
        text = f"vCPU{i} {where}, RIP {cpu['rip']}"
        r: Optional[Dict[str, int]] = rates[i] if i < len(rates) else None
        if r:
            text += " (" + ", ".join(f"{r[k]} {k}/s" for k in ("exits", "pf_taken", "halt_exits") if k in r) + ")"
        apic = lapics[i] if i < len(lapics) else {}
        for reg in ("irr", "isr"):
            if apic.get(reg):
                text += f", {reg.upper()} " + " ".join(str(v) for v in apic[reg])
        parts.append(text)
    if snap.get("incomplete") and len(parts) <= 1:
        parts.append("no vCPU state: " + str(snap["incomplete"])[:120])
    return "; ".join(parts)
