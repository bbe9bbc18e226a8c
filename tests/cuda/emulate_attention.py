"""Lane-level CPU emulation of the CUDA attention kernels' index arithmetic (no GPU needed).

Mirrors csrc/cuda/attention_fwd.cuh and attention_decode.cu statement by statement where the
layout matters: the same ldmatrix lane addresses, the PTX fragment layouts of
mma.m16n8k16 / m16n8k8 (A: a0 (g, 2t..2t+1), a1 (g+8, ..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
B: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); C: c0,c1 (g, 2t..2t+1), c2,c3 (g+8, ..)), the
ldmatrix distribution (thread l gets row l/4, columns 2(l%4), 2(l%4)+1 of each 8x8 matrix; with
.trans the transpose), the tile loop bounds, masking, opened rows, online softmax and the P
repacking. It checks the kernels' logic against attention_ref on the CPU; it cannot check the
hardware (that is the GPU test's job).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BM = BN = 64
LOG2E = 1.4426950408889634


def _ldsm(smem, addr, nmat, trans=False):
    """smem [rows, cols]; addr(lane) -> (row, col): start of the 8-element row given by that lane."""
    regs = np.zeros((32, nmat, 2))
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    for i in range(nmat):
        m = np.stack([smem[r, c:c + 8] for r, c in (addr(8 * i + j) for j in range(8))])  # 8 x 8
        if trans:
            regs[:, i, 0], regs[:, i, 1] = m[2 * t, g], m[2 * t + 1, g]
        else:
            regs[:, i, 0], regs[:, i, 1] = m[g, 2 * t], m[g, 2 * t + 1]
    return regs


def _frag_a16(a):
    A = np.zeros((16, 16))
    for l in range(32):
        g, t = l // 4, l % 4
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[l, 0], a[l, 1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a[l, 2], a[l, 3]
    return A


def _mma16816(d, a, b):
    """d [32, 4] += A (a [32,4,2]) @ B (b [32,2,2])."""
    A = _frag_a16(a)
    B = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b[l, 0], b[l, 1]
    _acc(d, A @ B)


def _mma1688(d, a, b):
    A = np.zeros((16, 8))
    B = np.zeros((8, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[l, 0], a[l, 1]
        B[2 * t:2 * t + 2, g] = b[l, 0]
    _acc(d, A @ B)


def _acc(d, C):
    for l in range(32):
        g, t = l // 4, l % 4
        d[l] += (C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1])


def _round(x, dtype):
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(dtype).double().numpy()


def attention_fwd(q, k, v, key_mask, scale, causal):
    """Emulated attn_fwd_kernel over the whole grid. q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (torch, bf16/fp16)."""
    dtype = q.dtype
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qn, kn, vn = (x.double().numpy() for x in (q, k, v))
    mk = None if key_mask is None else key_mask.numpy().astype(bool)
    out = np.zeros((B, Hq, Lq, D))
    k16, tail, nd_blocks, nb_blocks = D // 16, D % 16 == 8, D // 8, BN // 8
    scale_log2 = np.float32(scale * LOG2E)
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    for b in range(B):
        for hq in range(Hq):
            hk = hq // (Hq // Hkv)
            M = None if mk is None else mk[b]
            first_valid = Lk
            if M is not None and M.any():
                first_valid = int(np.argmax(M))
            pos_off = Lk - Lq
            for qb in range((Lq + BM - 1) // BM):
                q0 = qb * BM
                sQ = np.zeros((BM, D))
                n = min(BM, Lq - q0)
                sQ[:n] = qn[b, hq, q0:q0 + n]
                block_opened = M is not None and ((pos_off + q0 < first_valid) if causal else (first_valid >= Lk))
                n_begin, n_end = 0, Lk
                if causal and not block_opened:
                    n_end = min(Lk, pos_off + q0 + BM)
                if M is not None and not block_opened:
                    n_begin = (min(first_valid, Lk) // BN) * BN
                n_tiles = (n_end - n_begin + BN - 1) // BN if n_end > n_begin else 0
                for warp in range(4):
                    qf = [_ldsm(sQ, lambda l, ks=ks: (warp * 16 + l % 16, ks * 16 + (l // 16) * 8), 4)
                          for ks in range(k16)]
                    qt = _ldsm(sQ, lambda l: (warp * 16 + l % 16, k16 * 16), 2) if tail else None
                    r0 = q0 + warp * 16 + g
                    r1 = r0 + 8
                    pos0, pos1 = pos_off + r0, pos_off + r1

                    def opened(pos):
                        if M is None:
                            return np.zeros(32, bool)
                        return (pos < first_valid) if causal else np.full(32, first_valid >= Lk)

                    open0, open1 = opened(pos0), opened(pos1)
                    o = np.zeros((nd_blocks, 32, 4))
                    m0 = np.full(32, -np.inf)
                    m1 = np.full(32, -np.inf)
                    l0 = np.zeros(32)
                    l1 = np.zeros(32)
                    for it in range(n_tiles):
                        n0 = n_begin + it * BN
                        sK = np.zeros((BN, D))
                        sV = np.zeros((BN, D))
                        nk = min(BN, Lk - n0)
                        sK[:nk] = kn[b, hk, n0:n0 + nk]
                        sV[:nk] = vn[b, hk, n0:n0 + nk]
                        sMask = np.zeros(BN, bool)
                        if M is not None:
                            sMask[:nk] = M[n0:n0 + nk]
                        s = np.zeros((nb_blocks, 32, 4))
                        for nb in range(nb_blocks):
                            for ks in range(0, k16, 2):
                                bf = _ldsm(sK, lambda l, nb=nb, ks=ks: (nb * 8 + l % 8,
                                                                       (ks + l // 16) * 16 + ((l // 8) % 2) * 8), 4)
                                _mma16816(s[nb], qf[ks], bf[:, 0:2])
                                _mma16816(s[nb], qf[ks + 1], bf[:, 2:4])
                            if tail:
                                bf = _ldsm(sK, lambda l, nb=nb: (nb * 8 + l % 8, k16 * 16), 1)
                                _mma1688(s[nb], qt, bf)
                        s = s.astype(np.float32) * scale_log2
                        need_mask = M is not None or n0 + BN > Lk or (causal and n0 + BN - 1 > pos_off + q0)
                        if need_mask:
                            for nb in range(nb_blocks):
                                for e in range(4):
                                    j = n0 + nb * 8 + 2 * t + (e & 1)
                                    upper = e >= 2
                                    op = open1 if upper else open0
                                    pos = pos1 if upper else pos0
                                    ok = j < Lk
                                    inner = ok & ~op
                                    if causal:
                                        ok = ok & ~(inner & (j > pos))
                                    if M is not None:
                                        jj = np.clip(j - n0, 0, BN - 1)
                                        ok = ok & ~(inner & ~sMask[jj])
                                    s[nb, :, e] = np.where(ok, s[nb, :, e], -np.inf)
                        mx0 = np.max(np.maximum(s[:, :, 0], s[:, :, 1]), axis=0)
                        mx1 = np.max(np.maximum(s[:, :, 2], s[:, :, 3]), axis=0)
                        mx0 = mx0.reshape(8, 4).max(1).repeat(4)  # quad reduction (xor 1, 2)
                        mx1 = mx1.reshape(8, 4).max(1).repeat(4)
                        mn0, mn1 = np.maximum(m0, mx0), np.maximum(m1, mx1)
                        mu0 = np.where(mn0 == -np.inf, 0, mn0)
                        mu1 = np.where(mn1 == -np.inf, 0, mn1)
                        a0, a1 = np.exp2(m0 - mu0), np.exp2(m1 - mu1)
                        m0, m1 = mn0, mn1
                        s[:, :, 0:2] = np.exp2(s[:, :, 0:2] - mu0[None, :, None])
                        s[:, :, 2:4] = np.exp2(s[:, :, 2:4] - mu1[None, :, None])
                        l0 = l0 * a0 + s[:, :, 0:2].sum((0, 2))
                        l1 = l1 * a1 + s[:, :, 2:4].sum((0, 2))
                        o[:, :, 0:2] *= a0[None, :, None]
                        o[:, :, 2:4] *= a1[None, :, None]
                        p = _round(s, dtype)  # MT::pack
                        for kk in range(BN // 16):
                            a = np.zeros((32, 4, 2))
                            a[:, 0], a[:, 1] = p[2 * kk][:, 0:2], p[2 * kk][:, 2:4]
                            a[:, 2], a[:, 3] = p[2 * kk + 1][:, 0:2], p[2 * kk + 1][:, 2:4]
                            for nd in range(0, nd_blocks - 1, 2):
                                bf = _ldsm(sV, lambda l, kk=kk, nd=nd: (kk * 16 + l % 16, (nd + l // 16) * 8), 4,
                                           trans=True)
                                _mma16816(o[nd], a, bf[:, 0:2])
                                _mma16816(o[nd + 1], a, bf[:, 2:4])
                            if nd_blocks % 2:
                                nd = nd_blocks - 1
                                bf = _ldsm(sV, lambda l, kk=kk, nd=nd: (kk * 16 + l % 16, nd * 8), 2, trans=True)
                                _mma16816(o[nd], a, bf)
                    l0 = l0.reshape(8, 4).sum(1).repeat(4)
                    l1 = l1.reshape(8, 4).sum(1).repeat(4)
                    inv0 = np.where(l0 > 0, 1 / np.where(l0 > 0, l0, 1), 0)
                    inv1 = np.where(l1 > 0, 1 / np.where(l1 > 0, l1, 1), 0)
                    for nd in range(nd_blocks):
                        col = nd * 8 + 2 * t
                        for lane in range(32):
                            if r0[lane] < Lq:
                                out[b, hq, r0[lane], col[lane]:col[lane] + 2] = o[nd, lane, 0:2] * inv0[lane]
                            if r1[lane] < Lq:
                                out[b, hq, r1[lane], col[lane]:col[lane] + 2] = o[nd, lane, 2:4] * inv1[lane]
    return torch.from_numpy(_round(out, dtype)).to(dtype)


def attention_decode(q, k, v, key_mask, cache_seqlens, scale, num_splits, warps=4):
    """Emulated decode_kernel + combine_kernel (the split/lane/warp structure and the merges)."""
    dtype = q.dtype
    B, Hq, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qn, kn, vn = (x.double().numpy() for x in (q, k, v))
    lpk = D // 8
    kpw = 32 // lpk
    step = warps * kpw
    out = np.zeros((B, Hq, 1, D))
    for b in range(B):
        kv_len = Lk if cache_seqlens is None else max(0, min(Lk, int(cache_seqlens[b])))
        M = None if key_mask is None else key_mask[b].numpy().astype(bool)
        use_mask = M is not None and bool(M[:kv_len].any())
        per_split = (kv_len + num_splits - 1) // num_splits
        for hk in range(Hkv):
            heads = range(hk * group, (hk + 1) * group)
            parts = []  # per split: (lse [h], o [h, D])
            for split in range(num_splits):
                j_begin = split * per_split
                j_end = min(kv_len, j_begin + per_split)
                # one state per (warp, key slot); each holds all D dims (lane groups combined)
                states = {}
                for warp in range(warps):
                    for sub in range(kpw):
                        m = np.full(group, -np.inf)
                        l_ = np.zeros(group)
                        acc = np.zeros((group, D))
                        base = j_begin + warp * kpw
                        while base < j_end:
                            j = base + sub
                            if j < j_end and (not use_mask or M[j]):
                                s = np.array([np.dot(np.float32(scale * LOG2E) * qn[b, h, 0], kn[b, hk, j])
                                              for h in heads])
                                mn = np.maximum(m, s)
                                a, pj = np.exp2(m - mn), np.exp2(s - mn)
                                l_ = l_ * a + pj
                                acc = acc * a[:, None] + pj[:, None] * vn[b, hk, j][None, :]
                                m = mn
                            base += step
                        states[(warp, sub)] = (m, l_, acc)
                vals = list(states.values())
                mm = np.max([s[0] for s in vals], axis=0)
                ll = np.zeros(group)
                aa = np.zeros((group, D))
                for m, l_, acc in vals:
                    f = np.where(mm == -np.inf, 0, np.exp2(np.where(mm == -np.inf, 0, m - mm)))
                    ll += l_ * f
                    aa += acc * f[:, None]
                o = np.where(ll[:, None] > 0, aa / np.where(ll > 0, ll, 1)[:, None], 0)
                lse = np.where(ll > 0, mm + np.log2(np.where(ll > 0, ll, 1)), -np.inf)
                parts.append((lse, o))
            lses = np.stack([p[0] for p in parts])  # [S, h]
            mx = lses.max(0)
            w = np.where(np.isfinite(mx), np.exp2(lses - np.where(np.isfinite(mx), mx, 0)), 0)
            num = sum(w[s][:, None] * parts[s][1] for s in range(num_splits))
            den = w.sum(0)
            res = np.where(den[:, None] > 0, num / np.where(den > 0, den, 1)[:, None], 0)
            for i, h in enumerate(heads):
                out[b, h, 0] = res[i]
    return torch.from_numpy(_round(out, dtype)).to(dtype)


def default_scale(d):
    return 1 / math.sqrt(d)
