#!/usr/bin/env python3
"""Static performance check of the CUDA kernels, from their SASS (no GPU needed).

Reads the fatbins the build wrote (build/nvcc.rs: OUT_DIR/<stem>.fatbin), pulls out the sm_90 and sm_80
cubins with cuobjdump, disassembles them with nvdisasm (with the -lineinfo line table), finds each
kernel's hot loop and prints per kernel and architecture:

  - registers, spills, local memory, blocks per SM and occupancy;
  - the hot loop's instructions per element (per (a, b) pair for pass 1) by class, MUFU per element,
    the widths of its global loads and stores, how many 16-byte loads issue before the first
    instruction that waits on one of them, and how many memory levels one iteration chains;
  - on sm_90, the predicted bound on H100 and H200 (issue, MUFU, memory, latency) and the loss
    kernel's predicted time as a share of pass 1 at N = 1,000,000.

and fails (exit 1) when a budget below is broken. Budgets have a limit (checked: over it fails) and
the issue's target; a target not yet met is printed as OPEN on every run, never dropped silently.
The model and its arithmetic are written out in docs/PERFORMANCE.md ("Static SASS model").

Usage:
  python3 scripts/sass_check.py --fatbin-dir OUT_DIR [--kernels-dir kernels] [--tools-dir DIR]
         [--archs 90,80] [--json FILE]
  python3 scripts/sass_check.py --self-test      (the parser on a small built-in SASS listing)

Tools: cuobjdump and nvdisasm from the PyPI wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm, looked
for in --tools-dir, then $VPPO_NVCC_VENV (default ~/.cache/vppo/nvcc-venv)
lib/python3*/site-packages/nvidia/cu13/bin, then PATH. Plain python3, standard library only.
"""

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

# ------------------------------------------------------------------------------------------------
# Cards and architectures (public specifications; see docs/PERFORMANCE.md for the sources' figures)
# ------------------------------------------------------------------------------------------------

# Per-SM limits used by the occupancy arithmetic (CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability"): 64K 32-bit registers, allocated per warp in units of 256; max resident
# warps and blocks; shared memory per SM (the 1 KB per block the driver reserves is added per block).
ARCH_LIMITS = {
    "sm_90": {"regs": 65536, "warps": 64, "blocks": 32, "smem": 228 * 1024, "reserved_smem": 1024},
    "sm_80": {"regs": 65536, "warps": 64, "blocks": 32, "smem": 164 * 1024, "reserved_smem": 1024},
}
REG_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)

# The cards of sm_90 this project targets. SMs, boost clock and HBM peak are the datasheet figures;
# copy_tbs is the device-to-device copy bandwidth measured on the project's lent cards (ANCHORS.md),
# the achievable memory rate the benchmarks are judged against.
CARDS = [
    {"name": "H100 SXM", "sms": 132, "clock_ghz": 1.98, "hbm_tbs": 3.35, "copy_tbs": 3.0},
    {"name": "H200", "sms": 132, "clock_ghz": 1.98, "hbm_tbs": 4.8, "copy_tbs": 4.3},
]
ISSUE_PER_SM_CLK = 128  # 4 schedulers x 1 warp instruction (32 lanes) per clock
MUFU_PER_SM_CLK = 16  # exp2, log2, rcp, rsqrt... results per SM per clock on cc 8.0 and 9.0
# Latency model: a load that misses in L2 takes about DRAM_LATENCY_NS under load, one that hits in L2
# about L2_LATENCY_NS (assumptions, to be corrected by what Nsight Compute measures: scripts/gpu-check.sh
# records it). In a chain of dependent loads the first level is taken to go to DRAM (the streamed
# per-token arrays) and every further level to hit in L2 (small per-response arrays: cu_seqlens, alpha).
DRAM_LATENCY_NS = 600.0
L2_LATENCY_NS = 150.0

# The loss kernel's prediction is made at this size (the issue's): N tokens of V = 151,936 bf16 pass 1,
# and B responses of about 1,000 tokens (so a search over responses, where there is one, takes log2 B
# steps), in groups of LOSS_G (GRPO's usual 8: the group scope's loops over a group's responses). The
# second size, a realistic batch (16 responses of 1,024 tokens), is printed for information only.
LOSS_N = 1_000_000
LOSS_B = 1_000
LOSS_G = 8
LOSS_SIZES = [(LOSS_N, LOSS_B), (16_384, 16)]
PASS1_V = 151_936
# Pass 2b is three launches (vppo_loss_prep, vppo_loss, vppo_loss_finish), each waiting for the one
# before on the stream: each is charged this gap (launch latency plus the drain and ramp between two
# dependent kernels; an assumption until the GPU script measures it).
LAUNCH_GAP_NS = 3000.0

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}

# ------------------------------------------------------------------------------------------------
# Budgets
# ------------------------------------------------------------------------------------------------
#
# (kernel regex, arch regex, metric, op, limit, target). `limit` is what CI enforces now; `target` is
# the issue's goal (issue 12). Where the two differ the target is OPEN and printed as such. Tighten a
# limit to its target when a change reaches it.
BUDGETS = [
    # pass 1, bf16 (the production dtype): instructions per (a, b) pair, 16-byte loads in flight per
    # thread before the first wait, registers (40 gives 6 blocks of 256 threads per SM).
    (r"vppo_perception_bf16$", r"sm_90", "instr_per_elem", "<=", 20.0, 20.0),
    (r"vppo_perception_bf16$", r"sm_90", "loads_before_wait", ">=", 4, 4),
    (r"vppo_perception_bf16$", r"sm_90", "registers", "<=", 40, 40),
    # pass 3, bf16 in and out: instructions per element.
    (r"vppo_backward_bf16_bf16$", r"sm_90", "instr_per_elem", "<=", 17.0, 17.0),
    # everywhere: no local memory (spills or stack arrays), and the hot loops' logits loads and
    # gradient stores 16 bytes wide.
    (r"vppo_", r".", "local_bytes", "<=", 0, 0),
    (r"vppo_(perception|backward)_", r".", "hot_loads_not_16B", "<=", 0, 0),
    (r"vppo_backward_", r".", "hot_stores_not_16B", "<=", 0, 0),
    # the logits stream carries the evict-first hint (__ldcs: LDG.E.EF), so it does not flush pass 1's
    # small outputs from L2 before pass 2 reads them.
    (r"vppo_(perception|backward)_", r".", "hot_loads_not_evict_first", "<=", 0, 0),
    # the KL op's backward (kernels/kl_div.cu): both rows read and both gradient rows written 16 bytes
    # wide in the hot loop, the reads evict-first.
    (r"vppo_kl_div_backward_", r".", "hot_loads_not_16B", "<=", 0, 0),
    (r"vppo_kl_div_backward_", r".", "hot_stores_not_16B", "<=", 0, 0),
    (r"vppo_kl_div_backward_", r".", "hot_loads_not_evict_first", "<=", 0, 0),
    # the loss kernel at N = 1,000,000 against pass 1 bf16 (predicted on H100 and H200).
    (r"vppo_loss$", r"sm_90", "loss_share_of_pass1_pct", "<=", 2.0, 2.0),
]

# ------------------------------------------------------------------------------------------------
# Which loop is hot, per kernel
# ------------------------------------------------------------------------------------------------
#
# kind "stream": the innermost loop with the most 16-byte global loads (pass 1 and pass 3 stream the
# logits there). kind "anchor": the innermost loop holding an instruction of the source line that
# matches `anchor` (the loss kernel's per-token loop). `cold` names source functions whose code runs
# rarely (rebasing the running maximum, which happens O(log V) times per row): their instructions are
# reported but not counted in the hot path.
KERNELS = [
    {
        "match": r"vppo_perception_(f32|f16|bf16)$",
        "file": "perception.cu",
        "kind": "stream",
        "unit": "pair",
        "tensors": 2,  # 16-byte loads of a and of b: one pair per element of each
        "cold": ["rebase_a", "rebase_b", "fold_chunk_slow"],
        "threads": "VPPO_PERCEPTION_THREADS",
        "dyn_smem": ("VPPO_PERCEPTION_THREADS", "VPPO_PERCEPTION_STATE_BYTES"),
    },
    {
        "match": r"vppo_backward_(f32|f16|bf16)_(f32|f16|bf16)$",
        "file": "backward.cu",
        "kind": "stream",
        "unit": "element",
        "tensors": 1,
        "cold": ["target_vector"],
        "threads": "VPPO_BACKWARD_THREADS",
        "dyn_smem": None,
    },
    {
        "match": r"vppo_backward_full_(f32|f16|bf16)_(f32|f16|bf16)$",
        "file": "backward.cu",
        "kind": "stream",
        "unit": "element",
        "tensors": 2,  # the logits row and the ref_logits row
        "cold": [],
        "threads": "VPPO_BACKWARD_THREADS",
        "dyn_smem": None,
    },
    {
        "match": r"vppo_kl_div_backward_(f32|f16|bf16)$",
        "file": "kl_div.cu",
        "kind": "stream",
        "unit": "element",
        "tensors": 2,  # 16-byte loads of p and of q: an element of each per element
        "cold": [],
        "threads": "VPPO_KL_DIV_THREADS",
        "dyn_smem": None,
    },
    {
        # the per-token loss: a grid over tiles of VPPO_LOSS_TILE_TOKENS tokens, each thread
        # VPPO_LOSS_TOKENS_PER_THREAD of them per tile; the hot loop is the innermost loop holding the
        # dlogp store, and its tokens per iteration are the stores of that line in it (the token loop
        # unrolled: 4 per tile iteration)
        "match": r"vppo_loss$",
        "file": "select_loss.cu",
        "kind": "anchor",
        "anchor": r"p\.dlogp\[t\]\s*=",
        "unit": "token",
        "cold": [],
        "threads": "VPPO_LOSS_TILE_THREADS",
        "dyn_smem": ("VPPO_LOSS_TILE_SHARED_BYTES",),
    },
    {
        # the one-block kernels of pass 2b: loops over the B responses (prep) or the tiles (finish)
        "match": r"vppo_loss_prep$",
        "file": "select_loss.cu",
        "kind": "one_block",
        "threads": "VPPO_LOSS_THREADS",
        "dyn_smem": ("VPPO_LOSS_SHARED_BYTES",),
    },
    {
        "match": r"vppo_loss_finish$",
        "file": "select_loss.cu",
        "kind": "one_block",
        "threads": "VPPO_LOSS_THREADS",
        "dyn_smem": ("VPPO_LOSS_TILE_SHARED_BYTES",),
    },
    {
        "match": r"vppo_select$",
        "file": "select_loss.cu",
        "kind": None,  # resources only
        "threads": "VPPO_SELECT_THREADS",
        "dyn_smem": ("VPPO_SELECT_SHARED_BYTES",),
    },
]

# ------------------------------------------------------------------------------------------------
# SASS parsing
# ------------------------------------------------------------------------------------------------

INSN_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
LABEL_RE = re.compile(r"^\s*(\.L_x_\d+|\$[\w$.]+):\s*$")
LINE_RE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
FUNC_RE = re.compile(r"^\s*\.text\.(\w+):\s*$")
TARGET_RE = re.compile(r"`\(([^)]+)\)")
REG_RE = re.compile(r"\bR(\d+)(\.64|\.reuse)*\b")


class Insn:
    __slots__ = ("addr", "pred", "op", "operands", "file", "line", "text")

    def __init__(self, addr, pred, op, operands, file, line, text):
        self.addr = addr
        self.pred = pred
        self.op = op
        self.operands = operands
        self.file = file
        self.line = line
        self.text = text

    @property
    def base(self):
        return self.op.split(".")[0]


def parse_sass(text):
    """Returns {function: (instructions, labels)} with labels {name: address}."""
    funcs = {}
    cur = None
    file, line = None, None
    pending_labels = []
    for raw in text.splitlines():
        m = FUNC_RE.match(raw)
        if m:
            cur = m.group(1)
            funcs[cur] = ([], {})
            file, line = None, None
            pending_labels = []
            continue
        if cur is None:
            continue
        m = LINE_RE.match(raw)
        if m:
            file, line = m.group(1), int(m.group(2))
            continue
        m = LABEL_RE.match(raw)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = INSN_RE.match(raw)
        if not m:
            continue
        addr = int(m.group(1), 16)
        body = m.group(2).strip().rstrip(";").strip()
        pred = None
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        parts = body.split(None, 1)
        op = parts[0]
        operands = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
        insns, labels = funcs[cur]
        for lab in pending_labels:
            labels[lab] = addr
        pending_labels = []
        insns.append(Insn(addr, pred, op, operands, file, line, body))
    return funcs


def classify(insn):
    """Instruction class for the per-element breakdown."""
    b = insn.base
    if b in ("LDG", "STG", "LD", "ST", "LDS", "STS", "LDL", "STL", "ATOM", "ATOMG", "RED", "REDG",
             "LDC", "LDSM", "LDGSTS", "ATOMS"):
        return "mem"
    if b == "MUFU":
        return "mufu"
    if b in ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "HADD2",
             "HMUL2", "HFMA2", "HSETP2", "HMNMX2", "FSWZADD"):
        return "fp32"
    if b in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX"):
        return "fp64"
    if b in ("F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "I2I", "F2IP"):
        return "cvt"
    if b in ("MOV", "UMOV", "ULDC", "SEL", "PRMT", "SHFL", "R2UR", "S2R", "S2UR", "CS2R", "P2R", "R2P", "USEL",
             "UPRMT", "MOVM"):
        return "move"
    if b in ("BRA", "BRX", "JMP", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "BREAK", "BAR", "WARPSYNC",
             "NOP", "YIELD", "VOTE", "VOTEU", "ENDCOLLECTIVE", "BMOV", "BPT", "KILL", "ELECT"):
        return "ctrl"
    if b in ("IMAD", "IADD3", "LOP3", "SHF", "ISETP", "LEA", "IABS", "IMNMX", "VIMNMX", "VIADD",
             "VIADDMNMX", "POPC", "FLO", "BREV", "PLOP3", "UIADD3", "UIMAD", "ULOP3", "USHF", "ULEA",
             "UISETP", "UPLOP3", "UFLO", "IDP", "IMUL", "SGXT", "BMSK", "LEA", "UBMSK", "USGXT", "ISCADD"):
        # IMAD.MOV / IMAD.U32 x, 1 are moves in disguise, but they use the integer pipe: keep them here.
        return "int"
    return "other"


def mem_width(insn):
    """Bytes per thread of a global/generic/local load or store, else None."""
    if insn.base not in ("LDG", "STG", "LD", "ST", "LDL", "STL"):
        return None
    mods = insn.op.split(".")[1:]
    for m, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return w
    return 4


def is_load(insn):
    return insn.base in ("LDG", "LD", "LDL", "LDS", "LDC") and insn.base != "LDC"


def dest_regs(insn):
    """Registers an instruction writes (its first operand, widened for 64/128-bit results)."""
    if not insn.operands or insn.base in ("STG", "ST", "STS", "STL", "RED", "REDG", "BRA", "BSSY",
                                          "BSYNC", "CALL", "EXIT", "BAR", "WARPSYNC"):
        return set()
    m = re.match(r"^R(\d+)", insn.operands[0])
    if not m:
        return set()
    r = int(m.group(1))
    n = 1
    w = mem_width(insn)
    if w is not None and is_load(insn):
        n = max(1, w // 4)
    elif insn.base in ("DADD", "DMUL", "DFMA", "F2F", "I2F") and ".F64" in insn.op + ".F64":
        n = 2 if insn.base.startswith("D") else 1
    return {r + i for i in range(n)}


def src_regs(insn):
    """Registers an instruction reads (64-bit address operands count both halves)."""
    ops = insn.operands if (insn.base in ("STG", "ST", "STS", "STL", "RED", "REDG")) else insn.operands[1:]
    regs = set()
    for o in ops:
        for m in REG_RE.finditer(o):
            r = int(m.group(1))
            regs.add(r)
            if m.group(2) == ".64" or (insn.base.startswith("D") and insn.base in ("DADD", "DMUL", "DFMA", "DSETP")):
                regs.add(r + 1)
    if insn.base in ("STG", "ST", "STL"):
        w = mem_width(insn) or 4
        data = insn.operands[-1] if insn.operands else ""
        m = re.match(r"^R(\d+)", data)
        if m:
            regs |= {int(m.group(1)) + i for i in range(max(1, w // 4))}
    regs.discard(255)  # RZ is not a register
    return regs


def loops_of(insns, labels):
    """Back edges as (head_index, branch_index) pairs, innermost first."""
    index = {ins.addr: i for i, ins in enumerate(insns)}
    loops = []
    for i, ins in enumerate(insns):
        if ins.base not in ("BRA", "BRX", "JMP"):
            continue
        m = TARGET_RE.search(ins.text)
        if not m or m.group(1) not in labels:
            continue
        tgt = labels[m.group(1)]
        if tgt < ins.addr and tgt in index:
            loops.append((index[tgt], i))
    loops = sorted(set(loops), key=lambda hb: hb[1] - hb[0])
    return loops


def nested(loops, loop):
    """The loops strictly inside `loop`."""
    h, b = loop
    return [(h2, b2) for (h2, b2) in loops if (h2, b2) != loop and h <= h2 and b2 <= b]


# ------------------------------------------------------------------------------------------------
# Source line ranges of named functions (for `cold` and `anchor`)
# ------------------------------------------------------------------------------------------------


def function_lines(src_text, name):
    """(first, last) 1-based line numbers of the definition of function `name`, or None."""
    lines = src_text.splitlines()
    pat = re.compile(r"\b" + re.escape(name) + r"\s*\(")
    for i, l in enumerate(lines):
        if pat.search(l) and not l.strip().startswith(("//", "/*", "*")) and ";" not in l.split(")")[-1]:
            # the definition: a '{' before the next ';' at depth 0
            depth, started = 0, False
            for j in range(i, len(lines)):
                for ch in lines[j]:
                    if ch == "{":
                        depth += 1
                        started = True
                    elif ch == "}":
                        depth -= 1
                        if started and depth == 0:
                            return (i + 1, j + 1)
                    elif ch == ";" and not started:
                        break
                else:
                    continue
                if not started:
                    break
    return None


# ------------------------------------------------------------------------------------------------
# Analysis of one kernel on one architecture
# ------------------------------------------------------------------------------------------------


def elem_bytes(kernel):
    """(input bytes per element, output bytes per element) from the kernel name's dtypes."""
    parts = kernel.split("_")
    if kernel.startswith("vppo_perception_"):
        return DTYPE_BYTES[parts[2]], 0
    if kernel.startswith("vppo_backward_full_"):
        return DTYPE_BYTES[parts[3]], DTYPE_BYTES[parts[4]]
    if kernel.startswith("vppo_backward_"):
        return DTYPE_BYTES[parts[2]], DTYPE_BYTES[parts[3]]
    if kernel.startswith("vppo_kl_div_backward_"):
        # two gradient rows of the input dtype written per element (of p and of q)
        return DTYPE_BYTES[parts[4]], 2 * DTYPE_BYTES[parts[4]]
    return None, None


def occupancy(arch, regs, threads, smem_block):
    lim = ARCH_LIMITS[arch]
    warps = (threads + 31) // 32
    regs_warp = ((max(regs, 1) * 32 + REG_UNIT - 1) // REG_UNIT) * REG_UNIT
    by_regs = lim["regs"] // (regs_warp * warps)
    by_warps = lim["warps"] // warps
    by_smem = lim["smem"] // (smem_block + lim["reserved_smem"]) if smem_block else lim["blocks"]
    blocks = min(by_regs, by_warps, lim["blocks"], by_smem)
    return blocks, blocks * warps / lim["warps"]


def mem_depth(path):
    """Longest chain of dependent loads along `path` (a load whose address comes from a load)."""
    depth = {}
    best = 0
    for ins in path:
        d = max((depth.get(r, 0) for r in src_regs(ins)), default=0)
        if is_load(ins):
            d += 1
            best = max(best, d)
        for r in dest_regs(ins):
            depth[r] = d
    return best


def loads_before_wait(path):
    """16-byte global loads issued, from the first one, before an instruction reads or overwrites the
    destination of one of them. `path` is walked twice (the loop wraps around)."""
    pending = set()
    issued = 0
    started = False
    for ins in path + path:
        regs_in = src_regs(ins) | (dest_regs(ins) if not (is_load(ins) and mem_width(ins) == 16) else set())
        if started and regs_in & pending:
            return issued
        if ins.base in ("LDG", "LD") and mem_width(ins) == 16:
            started = True
            issued += 1
            pending |= dest_regs(ins)
    return issued


def analyse(kernel, arch, insns, labels, res, cfg, params, src_text):
    out = {"kernel": kernel, "arch": arch}
    regs = res.get("REG", 0)
    out["registers"] = regs
    out["local_bytes"] = res.get("LOCAL", 0) + res.get("STACK", 0)
    out["local_insns"] = sum(1 for i in insns if i.base in ("LDL", "STL"))
    out["local_bytes"] += out["local_insns"]  # any LDL/STL counts even if the frame says 0
    threads = params.get(cfg["threads"], 0)
    smem = res.get("SHARED", 0)
    if cfg.get("dyn_smem"):
        prod = 1
        for name in cfg["dyn_smem"]:
            prod *= params.get(name, 0)
        smem += prod
    out["threads"] = threads
    out["smem_block"] = smem
    blocks, occ = occupancy(arch, regs, threads, smem)
    out["blocks_per_sm"] = blocks
    out["occupancy"] = occ
    if not cfg.get("kind"):
        return out

    loops = loops_of(insns, labels)
    if cfg["kind"] == "one_block":
        # Each outermost loop: its memory chain per trip (DRAM_LATENCY_NS for the first level,
        # L2_LATENCY_NS for each further one) and, for the loops nested in it, LOSS_G trips of theirs.
        out["loops"] = []
        for lp in loops:
            if any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in loops):
                continue
            inner = [l2 for l2 in nested(loops, lp)
                     if not any(o != l2 and o in nested(loops, lp) and o[0] <= l2[0] and l2[1] <= o[1]
                                for o in loops)]
            inner_idx = set()
            for (h2, b2) in inner:
                inner_idx |= set(range(h2, b2 + 1))
            body = [insns[i] for i in range(lp[0], lp[1] + 1) if i not in inner_idx]
            out["loops"].append({
                "range": "0x%04x-0x%04x" % (insns[lp[0]].addr, insns[lp[1]].addr),
                "depth": mem_depth(body),
                "inner_depths": [mem_depth(insns[h2:b2 + 1]) for (h2, b2) in inner],
            })
        return out
    cold_lines = set()
    for fn in cfg.get("cold", []):
        rng = function_lines(src_text, fn)
        if rng:
            cold_lines |= set(range(rng[0], rng[1] + 1))
    src_name = cfg["file"]

    # An instruction of the kernel's own file is cold when its line is in a cold function; one of a
    # header (the inlined body of expf, exp2f...) takes the state of the last own-file instruction
    # before it in its basic block, so the math a cold function calls is cold too.
    # Only within a basic block: a label (a branch target) starts hot again.
    cold_at = {}
    state = False
    block_starts = set(labels.values())
    prev = None
    for ins in insns:
        if ins.addr in block_starts or (prev is not None and prev.base in ("BRA", "BRX", "JMP", "EXIT", "RET")):
            state = False
        prev = ins
        if ins.file is not None and ins.file.endswith("/" + src_name):
            state = ins.line in cold_lines
        cold_at[ins.addr] = state

    def is_cold(ins):
        return cold_at[ins.addr]

    hot = None
    if cfg["kind"] == "stream":
        best = -1
        for lp in loops:
            if nested(loops, lp):
                continue
            n = sum(1 for i in insns[lp[0]:lp[1] + 1] if i.base in ("LDG", "LD") and mem_width(i) == 16)
            if n > best:
                best, hot = n, lp
        if best <= 0:
            out["error"] = "no loop with 16-byte loads"
            return out
    else:
        pat = re.compile(cfg["anchor"])
        anchor_lines = {n + 1 for n, l in enumerate(src_text.splitlines()) if pat.search(l)}
        for lp in loops:  # innermost first
            if any(i.file and i.file.endswith("/" + src_name) and i.line in anchor_lines
                   for i in insns[lp[0]:lp[1] + 1]):
                hot = lp
                break
        if hot is None:
            out["error"] = "no loop holds the anchor line"
            return out

    h, b = hot
    inner = nested(loops, hot)
    inner_idx = set()
    for (h2, b2) in inner:
        inner_idx |= set(range(h2, b2 + 1))
    body = [insns[i] for i in range(h, b + 1) if i not in inner_idx]
    path = [i for i in body if not is_cold(i)]
    cold = [i for i in body if is_cold(i)]
    out["hot_loop"] = "0x%04x-0x%04x" % (insns[h].addr, insns[b].addr)
    out["loop_insns_all"] = b - h + 1
    out["cold_insns"] = len(cold)

    # Inner loops (the loss kernel's binary search): body x trips, trips = log2 of LOSS_B.
    inner_cost = 0
    inner_path = []
    out["inner_loops"] = []
    for (h2, b2) in inner:
        if any((h2 >= h3 and b2 <= b3 and (h3, b3) != (h2, b2)) for (h3, b3) in inner):
            continue
        trips = math.ceil(math.log2(LOSS_B))
        n = b2 - h2 + 1
        inner_cost += n * trips
        inner_path += [insns[i] for i in range(h2, b2 + 1)] * 1
        out["inner_loops"].append({"range": "0x%04x-0x%04x" % (insns[h2].addr, insns[b2].addr),
                                   "insns": n, "trips_assumed": trips})

    classes = {}
    for i in path:
        c = classify(i)
        classes[c] = classes.get(c, 0) + 1
    mufu = sum(1 for i in path if i.base == "MUFU")

    loads16 = sum(1 for i in path if i.base in ("LDG", "LD") and mem_width(i) == 16)
    if cfg["kind"] == "stream":
        in_b, out_b = elem_bytes(kernel)
        elems = loads16 * (16 // in_b) // cfg["tensors"]
        out["bytes_per_elem"] = cfg["tensors"] * in_b + out_b
    else:
        # tokens per iteration: the stores of the anchor line (the token loop, unrolled or not)
        elems = max(1, sum(1 for i in path if i.base in ("STG", "ST") and i.file
                           and i.file.endswith("/" + src_name) and i.line in anchor_lines))
        out["bytes_per_elem"] = sum(mem_width(i) or 0 for i in path
                                    if i.base in ("LDG", "STG", "LD", "ST")) / elems
    out["elems_per_iter"] = elems
    out["insns_per_iter"] = len(path) + inner_cost
    out["instr_per_elem"] = (len(path) + inner_cost) / elems
    out["classes_per_elem"] = {c: n / elems for c, n in sorted(classes.items())}
    out["mufu_per_elem"] = mufu / elems
    loads = [i for i in path if i.base in ("LDG", "LD")]
    stores = [i for i in path if i.base in ("STG", "ST")]
    out["load_widths"] = sorted({mem_width(i) for i in loads})
    out["store_widths"] = sorted({mem_width(i) for i in stores})
    out["hot_loads_not_16B"] = sum(1 for i in loads if mem_width(i) != 16)
    out["hot_stores_not_16B"] = sum(1 for i in stores if mem_width(i) != 16)
    out["hot_loads_not_evict_first"] = sum(1 for i in loads if ".EF" not in i.op)
    out["loads_16B_per_iter"] = loads16
    out["loads_before_wait"] = loads_before_wait(path) if loads16 else 0
    depth = mem_depth(path)
    if inner:
        depth += mem_depth(inner_path) * math.ceil(math.log2(LOSS_B))
    out["mem_depth"] = depth
    return out


# ------------------------------------------------------------------------------------------------
# Predicted bounds (sm_90 cards)
# ------------------------------------------------------------------------------------------------


def predict_stream(r, card):
    """Elements per second under each bound for a streaming kernel, and the binding one."""
    clk = card["clock_ghz"] * 1e9
    sms = card["sms"]
    issue = sms * clk * ISSUE_PER_SM_CLK / r["instr_per_elem"]
    mufu = sms * clk * MUFU_PER_SM_CLK / r["mufu_per_elem"] if r["mufu_per_elem"] else float("inf")
    memory = card["copy_tbs"] * 1e12 / r["bytes_per_elem"]
    # Little's law: bytes in flight per SM / latency. Each resident thread has loads_before_wait
    # 16-byte loads in flight; per iteration it waits once per batch of them.
    threads = r["blocks_per_sm"] * r["threads"]
    inflight = threads * r["loads_before_wait"] * 16 * sms
    latency = inflight / (DRAM_LATENCY_NS * 1e-9) / r["bytes_per_elem"]
    bounds = {"issue": issue, "mufu": mufu, "memory": memory, "latency": latency}
    binding = min(bounds, key=bounds.get)
    return bounds, binding


def chain_ns(depth):
    """A chain of `depth` dependent memory levels: the first from DRAM, each further one an L2 hit."""
    return DRAM_LATENCY_NS + (max(1, depth) - 1) * L2_LATENCY_NS


def one_block_ns(r, count):
    """A one-block kernel whose outermost loops each run ceil(count / threads) trips (prep: the B
    responses; finish: the tiles), a nested loop LOSS_G trips per trip, plus the launch gap."""
    trips = math.ceil(count / max(1, r["threads"]))
    t = LAUNCH_GAP_NS
    for lp in r["loops"]:
        t += trips * (chain_ns(lp["depth"]) + sum(LOSS_G * chain_ns(d) for d in lp["inner_depths"]))
    return t


def predict_loss(r, card, params, one_block, n, b):
    """Seconds of pass 2b (prep, the tiles, finish) at n tokens and b responses on `card`."""
    clk = card["clock_ghz"] * 1e9
    tile = params["VPPO_LOSS_TILE_TOKENS"]
    per_thread = params["VPPO_LOSS_TOKENS_PER_THREAD"]
    tiles = math.ceil(n / tile)
    grid = min(tiles, params.get("VPPO_MAX_ROW_BLOCKS_GPU", 65535))
    per_sm = max(1, r["blocks_per_sm"])
    resident = min(grid, card["sms"] * per_sm)
    sms_used = min(card["sms"], math.ceil(grid / per_sm))
    issue = n * r["instr_per_elem"] / (ISSUE_PER_SM_CLK * sms_used * clk)
    # one tile per resident block at a time; each thread runs ceil(tokens per thread / tokens per
    # iteration) iterations of the hot loop per tile, each a chain of mem_depth levels
    rounds = math.ceil(tiles / resident)
    iters = math.ceil(per_thread / r["elems_per_iter"])
    latency = rounds * iters * chain_ns(r["mem_depth"]) * 1e-9
    memory = n * r["bytes_per_elem"] / (card["copy_tbs"] * 1e12)
    bounds = {"issue": issue, "latency": latency, "memory": memory}
    binding = max(bounds, key=bounds.get)
    extra = {"grid": grid, "tiles": tiles, "launch": LAUNCH_GAP_NS * 1e-9}
    for name, count in (("vppo_loss_prep", b), ("vppo_loss_finish", tiles)):
        extra[name] = one_block_ns(one_block[name], count) * 1e-9 if name in one_block else float("nan")
    total = bounds[binding] + extra["launch"] + extra["vppo_loss_prep"] + extra["vppo_loss_finish"]
    return bounds, binding, extra, total


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def find_tool(name, tools_dir):
    cands = []
    if tools_dir:
        cands.append(os.path.join(tools_dir, name))
    venv = os.environ.get("VPPO_NVCC_VENV") or os.path.expanduser("~/.cache/vppo/nvcc-venv")
    cands += sorted(glob.glob(os.path.join(venv, "lib/python3*/site-packages/nvidia/cu13/bin", name)))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which(name)


def run(cmd, cwd=None):
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit("sass_check: %s failed (%d):\n%s%s" % (" ".join(cmd), p.returncode, p.stdout, p.stderr))
    return p.stdout


def parse_res_usage(text):
    """cuobjdump -res-usage: {function: {REG: n, STACK: n, SHARED: n, LOCAL: n}}."""
    res = {}
    cur = None
    for l in text.splitlines():
        m = re.match(r"^\s*Function (\S+):\s*$", l)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in l:
            res[cur] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", l) if k in ("REG", "STACK", "SHARED", "LOCAL")}
            cur = None
    return res


def parse_params(path):
    params = {}
    try:
        text = open(path).read()
    except OSError:
        return params
    for m in re.finditer(r"^#define\s+(VPPO_\w+)\s+(\d+)\b", text, re.M):
        params[m.group(1)] = int(m.group(2))
    return params


def kernel_cfg(name):
    for cfg in KERNELS:
        if re.search(cfg["match"], name):
            return cfg
    return None


def check_budgets(results):
    """(failures, open_targets, lines) over all results."""
    fails, opens, lines = [], [], []
    for (krx, arx, metric, op, limit, target) in BUDGETS:
        hit = [r for r in results if re.search(krx, r["kernel"]) and re.search(arx, r["arch"]) and metric in r]
        if not hit:
            if krx.endswith("$") and not any(re.search(krx, r["kernel"]) for r in results):
                fails.append("budget %s %s: kernel %s not found" % (metric, op, krx))
            continue
        for r in hit:
            v = r[metric]
            ok_l = v <= limit if op == "<=" else v >= limit
            ok_t = v <= target if op == "<=" else v >= target
            state = "ok" if ok_t else ("OPEN (target %s %s)" % (op, target) if ok_l else "FAILED")
            line = "%-26s %-6s %-24s %10.3g %s %-6g %s" % (r["kernel"], r["arch"], metric, v, op, limit, state)
            lines.append(line)
            if not ok_l:
                fails.append(line)
            elif not ok_t:
                opens.append(line)
    return fails, opens, lines


def fmt_classes(c):
    return " ".join("%s %.2f" % (k, v) for k, v in c.items())


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fatbin-dir", help="directory with the build's <stem>.fatbin files (OUT_DIR)")
    ap.add_argument("--kernels-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
    ap.add_argument("--tools-dir", help="directory holding cuobjdump and nvdisasm")
    ap.add_argument("--archs", default="90,80", help="architectures to analyse (sm_90 is required)")
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--self-test", action="store_true", help="check the parser on a built-in listing")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test()
    if not args.fatbin_dir:
        ap.error("--fatbin-dir is required")

    cuobjdump = find_tool("cuobjdump", args.tools_dir)
    nvdisasm = find_tool("nvdisasm", args.tools_dir)
    if not cuobjdump or not nvdisasm:
        raise SystemExit("sass_check: cuobjdump/nvdisasm not found (pip install the pinned "
                         "nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels into the nvcc venv)")
    archs = ["sm_" + a.strip() for a in args.archs.split(",") if a.strip()]
    params = parse_params(os.path.join(args.kernels_dir, "vppo_params.h"))
    fatbins = sorted(glob.glob(os.path.join(args.fatbin_dir, "*.fatbin")))
    if not fatbins:
        raise SystemExit("sass_check: no *.fatbin in %s" % args.fatbin_dir)
    print("tools: %s, %s" % (cuobjdump, nvdisasm))
    print(run([nvdisasm, "--version"]).strip().splitlines()[-1])

    results = []
    seen_arch = set()
    with tempfile.TemporaryDirectory() as tmp:
        for fb in fatbins:
            stem = os.path.basename(fb)[: -len(".fatbin")]
            src_path = os.path.join(args.kernels_dir, stem + ".cu")
            src_text = open(src_path).read() if os.path.exists(src_path) else ""
            d = os.path.join(tmp, stem)
            os.makedirs(d)
            run([cuobjdump, "-xelf", "all", os.path.abspath(fb)], cwd=d)
            for arch in archs:
                cubins = glob.glob(os.path.join(d, "*.%s.cubin" % arch))
                if not cubins:
                    continue
                seen_arch.add(arch)
                cubin = cubins[0]
                res = parse_res_usage(run([cuobjdump, "-res-usage", cubin]))
                funcs = parse_sass(run([nvdisasm, "-c", "-g", cubin]))
                for name in sorted(funcs):
                    cfg = kernel_cfg(name)
                    if cfg is None:
                        continue
                    insns, labels = funcs[name]
                    r = analyse(name, arch, insns, labels, res.get(name, {}), cfg, params, src_text)
                    if "error" in r:
                        raise SystemExit("sass_check: %s on %s: %s" % (name, arch, r["error"]))
                    results.append(r)
    if "sm_90" not in seen_arch:
        raise SystemExit("sass_check: the fatbins hold no sm_90 SASS (build with sm_90 in VPPO_CUDA_ARCHS)")
    for a in archs:
        if a not in seen_arch:
            print("note: no %s SASS in the fatbins (VPPO_CUDA_ARCHS): not analysed" % a)

    # ---- the table ----
    print()
    print("%-26s %-6s %4s %5s %6s %5s %-13s %7s %6s %5s %5s %-8s %-8s %4s %5s" % (
        "kernel", "arch", "regs", "local", "blk/SM", "occ", "hot loop", "insn/it", "el/it", "unit",
        "i/el", "ld B", "st B", "lbw", "mufu"))
    for r in results:
        if "instr_per_elem" not in r:
            print("%-26s %-6s %4d %5d %6d %4.0f%%" % (r["kernel"], r["arch"], r["registers"], r["local_bytes"],
                                                     r["blocks_per_sm"], 100 * r["occupancy"]))
            continue
        cfg = kernel_cfg(r["kernel"])
        print("%-26s %-6s %4d %5d %6d %4.0f%% %-13s %7d %6d %5s %5.2f %-8s %-8s %4d %5.2f" % (
            r["kernel"], r["arch"], r["registers"], r["local_bytes"], r["blocks_per_sm"], 100 * r["occupancy"],
            r["hot_loop"], r["insns_per_iter"], r["elems_per_iter"], cfg["unit"], r["instr_per_elem"],
            ",".join(map(str, r["load_widths"])) or "-", ",".join(map(str, r["store_widths"])) or "-",
            r["loads_before_wait"], r["mufu_per_elem"]))
    print("\n(insn/it: hot-path instructions per iteration, the cold rebase code left out; i/el: per element;"
          " ld B / st B: widths in bytes of the hot loop's global loads / stores; lbw: 16-byte loads issued"
          " before the first wait on one of them)")
    print("\nper element by class (sm_90):")
    for r in results:
        if r["arch"] == "sm_90" and "classes_per_elem" in r:
            extra = " [cold code in the loop: %d insns]" % r["cold_insns"] if r["cold_insns"] else ""
            inner = "".join(" [inner loop %s: %d insns x %d trips]" % (l["range"], l["insns"], l["trips_assumed"])
                            for l in r["inner_loops"])
            print("  %-26s %s%s%s" % (r["kernel"], fmt_classes(r["classes_per_elem"]), extra, inner))

    # ---- predictions ----
    print("\npredicted bound, sm_90 (elements per second under each bound; the smallest binds):")
    for r in results:
        if r["arch"] != "sm_90" or "instr_per_elem" not in r or kernel_cfg(r["kernel"])["kind"] != "stream":
            continue
        for card in CARDS:
            bounds, binding = predict_stream(r, card)
            r.setdefault("predicted", {})[card["name"]] = {"bounds_per_s": bounds, "binding": binding}
            gbs = bounds[binding] * r["bytes_per_elem"] / 1e9
            print("  %-26s %-8s issue %.3g  mufu %.3g  memory %.3g  latency %.3g  -> %s-bound, %.0f GB/s"
                  " (%.0f%% of copy), issue headroom %.2fx" % (
                      r["kernel"], card["name"], bounds["issue"], bounds["mufu"], bounds["memory"],
                      bounds["latency"], binding, gbs, 100 * gbs / (card["copy_tbs"] * 1e3),
                      bounds["issue"] / bounds["memory"]))
    one_block = {r["kernel"]: r for r in results if r["arch"] == "sm_90" and "loops" in r}
    for r in results:
        if r["arch"] != "sm_90" or r["kernel"] != "vppo_loss" or "instr_per_elem" not in r:
            continue
        share = 0.0
        for (n, b) in LOSS_SIZES:
            for card in CARDS:
                bounds, binding, extra, total = predict_loss(r, card, params, one_block, n, b)
                # pass 1 bf16 at the same N: its per-pair rate times N V pairs
                p1 = next(x for x in results if x["kernel"] == "vppo_perception_bf16" and x["arch"] == "sm_90")
                pb, pbind = predict_stream(p1, card)
                t1 = n * PASS1_V / pb[pbind]
                pct = 100 * total / t1
                if n == LOSS_N:
                    share = max(share, pct)
                print("  %-26s %-8s N=%d, B=%d: vppo_loss %d tiles on %d blocks: issue %.4f ms, latency %.4f ms"
                      " (%d dependent memory levels per iteration), memory %.4f ms -> %.4f ms; + prep %.4f ms"
                      " + finish %.4f ms + 3 launch gaps = %.4f ms = %.3f%% of pass 1 bf16 (%.2f ms)%s" % (
                          r["kernel"], card["name"], n, b, extra["tiles"], extra["grid"], 1e3 * bounds["issue"],
                          1e3 * bounds["latency"], r["mem_depth"], 1e3 * bounds["memory"],
                          1e3 * bounds[binding], 1e3 * extra["vppo_loss_prep"], 1e3 * extra["vppo_loss_finish"],
                          1e3 * total, pct, 1e3 * t1, "" if n == LOSS_N else " (information)"))
        r["loss_share_of_pass1_pct"] = share

    # ---- budgets ----
    fails, opens, lines = check_budgets(results)
    print("\nbudgets (value, limit; ok = the issue's target met, OPEN = within the limit, target not yet met):")
    for l in lines:
        print("  " + l)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if opens:
        print("\n%d target(s) still OPEN (see above)" % len(opens))
    if fails:
        print("\nSASS CHECK FAILED: %d budget(s) broken:" % len(fails), file=sys.stderr)
        for l in fails:
            print("  " + l, file=sys.stderr)
        return 1
    print("\nSASS check passed: %d kernels x archs, no budget broken" % len(results))
    return 0


# ------------------------------------------------------------------------------------------------
# Self-test: a hand-written listing with a known answer
# ------------------------------------------------------------------------------------------------

SELF_TEST_SASS = """
//--------------------- .text.k --------------------------
.text.k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
	//## File "/x/k.cu", line 10
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R12.64] ;
        /*0030*/                   FADD R0, R4, R0 ;
        /*0040*/               @P0 LDG.E.128 R16, desc[UR4][R2.64] ;
	//## File "/x/k.cu", line 20
        /*0050*/                   MUFU.EX2 R20, R0 ;
        /*0060*/                   STG.E desc[UR4][R2.64], R20 ;
        /*0070*/              @!P1 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2) ;
"""


def self_test():
    funcs = parse_sass(SELF_TEST_SASS)
    insns, labels = funcs["k"]
    assert len(insns) == 10, len(insns)
    loops = loops_of(insns, labels)
    assert loops == [(1, 7)], loops  # the one-instruction self-loop after EXIT is no loop
    path = insns[1:8]
    assert loads_before_wait(path) == 2, loads_before_wait(path)
    assert [mem_width(i) for i in path if mem_width(i)] == [16, 16, 16, 4]
    assert classify(path[4]) == "mufu" and classify(path[2]) == "fp32"
    assert mem_depth(path) == 1
    assert occupancy("sm_90", 48, 256, 0)[0] == 5 and occupancy("sm_90", 40, 256, 0)[0] == 6
    assert occupancy("sm_90", 32, 256, 0) == (8, 1.0)
    assert function_lines("int f(int x) {\n  return x;\n}\nint g();\n", "f") == (1, 3)
    fails, opens, _ = check_budgets([{"kernel": "vppo_perception_bf16", "arch": "sm_90", "instr_per_elem": 30.0}])
    assert fails and not opens
    print("sass_check self-test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
