"""Compile every Triton kernel for an H100 (sm_90) without a GPU: Triton's own compiler and ptxas reject
what the CPU interpreter lets through (types, unsupported constructs). ``python tests/kernels_compile.py``
prints one JSON line {kernel variant: "ok" | error}."""

from __future__ import annotations

import json
import sys
import traceback


def variants():
    from llmforge.kernels import activations, cross_entropy, fp8, host_gather, lora_gated, nf4, rmsnorm, rope

    bf = "*bf16"
    for dtype in (bf, "*fp32"):
        for gemma in (False, True):
            yield (f"rmsnorm_fwd {dtype} gemma={gemma}", rmsnorm._rmsnorm_fwd,
                   dict(X=dtype, W=dtype, Y=dtype, RSTD="*fp32", stride_x="i32", stride_y="i32", n_cols="i32",
                        eps="fp32"), dict(GEMMA=gemma, BLOCK=4096))
            yield (f"rmsnorm_bwd {dtype} gemma={gemma}", rmsnorm._rmsnorm_bwd,
                   dict(DY=dtype, X=dtype, W=dtype, RSTD="*fp32", DX=dtype, DW_PARTIAL="*fp32", stride_dy="i32",
                        stride_x="i32", stride_dx="i32", n_rows="i32", n_cols="i32", rows_per_program="i32"),
                   dict(GEMMA=gemma, BLOCK=4096))
        for kind in (0, 1):
            yield (f"gated_fwd {dtype} kind={kind}", activations._gated_fwd,
                   dict(E=dtype, G=dtype, H=dtype, n="i32"), dict(KIND=kind, BLOCK=1024))
            yield (f"gated_bwd {dtype} kind={kind}", activations._gated_bwd,
                   dict(DH=dtype, E=dtype, G=dtype, DE=dtype, DG=dtype, n="i32"), dict(KIND=kind, BLOCK=1024))
            tiles = dict(BM=lora_gated.BLOCK_M, BN=lora_gated.BLOCK_N, BR=16, UPCAST=False)
            yield (f"lora_gated_fwd {dtype} kind={kind}", lora_gated._lora_gated_fwd,
                   dict(E=dtype, G=dtype, H=dtype, XA=dtype, xa_stride="i32", BE=dtype, BG=dtype, b_stride="i32",
                        M="i32", N="i32", rank="i32"), dict(KIND=kind, **tiles))
            yield (f"lora_gated_bwd {dtype} kind={kind}", lora_gated._lora_gated_bwd,
                   dict(DH=dtype, DYB=dtype, dyb_stride="i32", AD=dtype, a_stride="i32", E=dtype, G=dtype,
                        M="i32", N="i32", rank="i32"), dict(KIND=kind, **tiles))
        yield (f"gather_rows {dtype}", host_gather._gather_rows_kernel,
               dict(TABLE=dtype, IDS="*i64", OUT=dtype, n_rows="i32", n_cols="i32"), dict(BLOCK=host_gather.BLOCK))
        for backward in (False, True):
            yield (f"rope {dtype} backward={backward}", rope._rope_kernel,
                   dict(X=dtype, COS=dtype, SIN=dtype, n_t="i32", n_heads="i32", sxb="i32", sxh="i32", sxt="i32",
                        sxd="i32", scb="i32", sct="i32", scd="i32", half="i32"),
                   dict(BACKWARD=backward, BLOCK_H=32, BLOCK_D=64))
        for cap in (False, True):
            yield (f"ce_rows {dtype} softcap={cap}", cross_entropy._ce_rows,
                   dict(LOGITS=dtype, stride="i32", LABELS="*i64", LOSS="*fp32", n_vocab="i32", softcap="fp32",
                        scale="fp32", ignore_index="i32"), dict(HAS_SOFTCAP=cap, BLOCK=4096))
            yield (f"stream_rows {dtype} softcap={cap}", cross_entropy._stream_rows,
                   dict(LOGITS=dtype, stride="i32", LABELS="*i64", RUN_MAX="*fp32", RUN_SUM="*fp32", TARGET="*fp32",
                        ALPHA="*fp32", W=dtype, w_stride="i32", DH=dtype, dh_stride="i32", v0="i32", n_cols="i32",
                        n_hidden="i32", softcap="fp32", scale="fp32", ignore_index="i32"),
                   dict(HAS_SOFTCAP=cap, BLOCK=4096, BLOCK_H=1024))
        for double, to_fp8 in ((True, False), (False, False), (True, True)):
            kernels = {1: nf4._nf4_dequant, 2: nf4._nf4_dequant2, 3: nf4._nf4_dequant3}
            for nseg, kernel in kernels.items():  # one weight; gate+up; Q/K/V
                seg = dict(P="*u8", A="*u8" if double else "*fp32", C="*fp32", M="*fp32", F="*fp32", Q="*fp32",
                           O="*u8" if to_fp8 else dtype)
                sig = {}
                for i in range(nseg):
                    sig.update({f"{k}{i}": v for k, v in seg.items()})
                    sig[f"n{i}"] = "i32"
                    if i:
                        sig[f"start{i}"] = "i32"
                sig["INV"] = "*fp32"
                yield (f"nf4_dequant {dtype} double={double} fp8={to_fp8} segments={nseg}", kernel, sig,
                       dict(blocksize=64, blocksize2=256, DOUBLE=double, ROWS=nf4._rows_per_program(64), FP8=to_fp8))
        for n_in in (1, 2, 3):   # FP8 rows of x, of [de, dg], of [dq, dk, dv]
            sig = {**{f"X{i}": dtype for i in range(3)}, **{f"S{i}": "i32" for i in range(3)},
                   **{f"W{i}": "i32" for i in range(3)}, "OUT": "*u8", "SCALE": "*fp32", "out_stride": "i32"}
            yield (f"fp8 quantize_rows {dtype} inputs={n_in}", fp8._quantize_rows_kernel, sig,
                   dict(N_IN=n_in, BLOCK=2048))
    yield ("fp8 transpose *u8", fp8._transpose_kernel, dict(SRC="*u8", DST="*u8", rows="i32", cols="i32"),
           dict(TILE=64))


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llmforge.kernels import nf4

    target = GPUTarget("cuda", 90, 32)
    results = {}
    for name, fn, signature, constexprs in variants():
        try:
            sig = dict(signature, **{k: "constexpr" for k in constexprs})
            unfused = name.startswith("nf4_dequant")   # launched with nf4.LAUNCH_OPTIONS: no fused multiply-add
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                                    options=nf4.LAUNCH_OPTIONS if unfused else None)
            fused = [line.strip() for line in kernel.asm["ptx"].splitlines() if line.strip().startswith("fma.")]
            results[name] = f"fused multiply-add in the PTX: {fused[:2]}" if unfused and fused else "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()[-2500:]
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
    main()
