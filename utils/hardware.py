"""What the machine offers: whether the CPU computes bf16 natively (then ``--amp``, bf16 autocast, is the
fastest CPU training configuration; see the README's benchmarks), and its model name (recorded in results).

    python -m utils.hardware --amp_flag     prints "--amp" on a CPU with native bf16, "--no_amp" otherwise
"""
import argparse
import platform

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions computing bf16 products natively


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo does not exist."""
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name (Linux's /proc/cpuinfo), else the machine type (``platform.machine()``)."""
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "cpu"


def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amp_flag", action="store_true", help='print "--amp" when the CPU has native bf16, else "--no_amp"')
    args = parser.parse_args(argv)
    if args.amp_flag:
        print("--amp" if cpu_has_native_bf16() else "--no_amp")


if __name__ == "__main__":
    main()
