"""What the benchmarks print with each figure: the CPU flags that decide its speed."""
import re

#: the flags that change what is fastest here (float32 SIMD width, native bfloat16, AMX)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The :data:`SPEED_FLAGS` this CPU has (sorted; empty where ``cpuinfo`` is unreadable)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(" + "|".join(SPEED_FLAGS) + r")\b", text)))


def cpu_flags_text():
    """:func:`cpu_flags` as one line (``"unknown"`` when none is found)."""
    return " ".join(cpu_flags()) or "unknown"
