"""utils/hardware.py: CPU feature detection for the bf16 default of the demo scripts."""
from utils.hardware import cpu_has_native_bf16, main


def test_native_bf16_from_the_cpu_flags(tmp_path, capsys):
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 avx512vl\n")
    without.write_text("processor : 0\nflags : fpu sse avx2\n")
    assert cpu_has_native_bf16(str(with_bf16)) and not cpu_has_native_bf16(str(without))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))
    main(["--amp_flag"])
    assert capsys.readouterr().out.strip() in ("--amp", "--no_amp")
