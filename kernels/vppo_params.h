/*
 * vppo_params.h: the one contract between the kernels and Rust.
 *
 * Every kernel takes exactly one of these structs by value. The Rust mirror (src/params.rs) is made
 * from this header by bindgen (`cargo build --features bindgen` regenerates it and fails when the
 * committed copy differs), so the two cannot drift. Plain C: fixed-width integers, no bool, explicit
 * padding, so the layout is the same for nvcc, the host C++ of the SIMT executor and rustc.
 *
 * Pointers are device addresses on a GPU and host addresses on the SIMT executor. Shapes:
 *   N = n_tokens, V = vocab, B = n_responses.
 */
#ifndef VPPO_PARAMS_H
#define VPPO_PARAMS_H

#include <stdint.h>

/* Which per-token score drives the mask and the shaping (SPEC section 2). */
typedef enum VppoPerception {
    VPPO_PERCEPTION_FULL_KL = 0, /* clamp(kl, 0, score_clamp): exact, full vocabulary */
    VPPO_PERCEPTION_K3 = 1       /* clamp(k3, 0, score_clamp): the official single-sample estimate */
} VppoPerception;

/* Trajectory-level advantage shaping (SPEC section 4). */
typedef enum VppoShaping {
    VPPO_SHAPING_MEAN_PRESERVING = 0,
    VPPO_SHAPING_LINEAR = 1,
    VPPO_SHAPING_NONE = 2
} VppoShaping;

/* Over which responses lo = min Sbar and hi = max Sbar are taken. */
typedef enum VppoScope {
    VPPO_SCOPE_BATCH = 0,
    VPPO_SCOPE_GROUP = 1
} VppoScope;

/* How the masked per-token losses are reduced (SPEC section 5). */
typedef enum VppoAggregation {
    VPPO_AGG_TOKEN_MEAN = 0,
    VPPO_AGG_SEQ_MEAN_TOKEN_MEAN = 1,
    VPPO_AGG_SEQ_MEAN_TOKEN_SUM = 2
} VppoAggregation;

/* The per-token policy loss of the official compute_policy_loss (SPEC section 12). */
typedef enum VppoLossType {
    VPPO_LOSS_PPO = 0,        /* the clipped surrogate of SPEC section 5 on the token ratio */
    VPPO_LOSS_GSPO = 1,       /* the sequence log-ratio s_b, gradient through s_b to every token of b */
    VPPO_LOSS_GSPO_TOKEN = 2, /* the value of s_b, each token's gradient through its own logp */
    VPPO_LOSS_CISPO = 3       /* -A' logp c, c the clipped token ratio held constant */
} VppoLossType;

/* The KL penalty to a reference policy from ref_logp (SPEC section 12), k1 = logp - ref_logp. */
typedef enum VppoKlPenalty {
    VPPO_KL_NONE = 0, /* no KL term, ref_logp unread */
    VPPO_KL_K1 = 1,   /* k1 */
    VPPO_KL_ABS = 2,  /* |k1| */
    VPPO_KL_MSE = 3,  /* k1^2 / 2 */
    VPPO_KL_K3 = 4    /* clamp(exp(x) - x - 1, -K, K), x = clamp(ref_logp - logp, -C, C) */
} VppoKlPenalty;

/* Which per-token key picks the mask (SPEC section 12). TAS always uses the perception scores. */
typedef enum VppoMaskBy {
    VPPO_MASK_BY_PERCEPTION = 0,            /* the top top_fraction of each response by score */
    VPPO_MASK_BY_ENTROPY = 1,               /* the top entropy_top_fraction by entropy */
    VPPO_MASK_BY_PERCEPTION_OR_ENTROPY = 2  /* the union of the two, per token */
} VppoMaskBy;

/*
 * Errors a kernel finds in the data. The perception kernel reports the first bad row: the status word
 * keeps the minimum of (row << 8 | code) over all bad rows (an integer atomicMin, so the report does
 * not depend on scheduling), and the codes are numbered in the order the CPU reference checks a row.
 */
typedef enum VppoErrorCode {
    VPPO_ERR_NONE = 0,
    VPPO_ERR_TARGET_OUT_OF_RANGE = 1,    /* targets[t] outside [0, V) */
    VPPO_ERR_LOGITS_NONFINITE = 2,       /* NaN or +inf in logits row t */
    VPPO_ERR_LOGITS_ALL_NEG_INF = 3,     /* logits row t is all -inf */
    VPPO_ERR_TARGET_NEG_INF = 4,         /* logits[t, targets[t]] = -inf */
    VPPO_ERR_MASKED_NONFINITE = 5,       /* NaN or +inf in logits_masked row t */
    VPPO_ERR_MASKED_ALL_NEG_INF = 6,     /* logits_masked row t is all -inf */
    VPPO_ERR_LOGITS_OVERFLOW = 7         /* finite logits so far apart (|a - b| > 3.4e38) that f32 overflows */
} VppoErrorCode;

/*
 * Launch configuration, shared by the kernels (__launch_bounds__, static_asserts on the shared
 * structs) and the Rust launcher, so the two cannot disagree.
 */
#define VPPO_PERCEPTION_THREADS 256      /* threads per row of pass 1 */
#define VPPO_PERCEPTION_STATE_BYTES 28   /* sizeof(RowState): dynamic smem = threads * this */
#define VPPO_PARTIAL_STATE_FLOATS 9      /* per row in `partial` mode: m_a s_a e_a f_b m_b s_b flags a_y b_y */
#define VPPO_PARTIAL_HAS_TARGET 2u       /* flags bit of a partial state: the target's column is in this shard */
#define VPPO_SELECT_THREADS 256          /* threads per response of vppo_select */
#define VPPO_SELECT_SHARED_BYTES 2440    /* sizeof(SelectShared) */
#define VPPO_LOSS_THREADS 512            /* the one block of vppo_loss_prep and of vppo_loss_finish */
#define VPPO_LOSS_SHARED_BYTES 640       /* sizeof(LossShared) */
/* vppo_loss, the per-token part of pass 2b, runs over tiles of VPPO_LOSS_TILE_TOKENS consecutive
   tokens, each handled by one block of VPPO_LOSS_TILE_THREADS (a warp takes 32 x
   VPPO_LOSS_TOKENS_PER_THREAD consecutive tokens of it), so each tile's sums, and the sum of the
   tiles in tile order, are the same whatever the grid. */
#define VPPO_LOSS_TILE_THREADS 256
#define VPPO_LOSS_TOKENS_PER_THREAD 4
#define VPPO_LOSS_TILE_TOKENS 1024       /* VPPO_LOSS_TILE_THREADS x VPPO_LOSS_TOKENS_PER_THREAD */
#define VPPO_LOSS_TILE_SHARED_BYTES 1536 /* sizeof(TileShared) */
#define VPPO_BACKWARD_THREADS 256        /* threads per row of pass 3 */
#define VPPO_KL_DIV_THREADS 256          /* threads per row of the KL op's backward (kernels/kl_div.cu) */

/*
 * Blocks of the row kernels (perception, backward) and of vppo_select loop over rows, so the launcher
 * caps the grid and any N runs. On a GPU the cap is far above the blocks that fit at once (132 SMs x 8
 * blocks on an H100); on the SIMT executor a small cap makes every test with more than 64 rows exercise
 * the grid-stride loop.
 */
#define VPPO_MAX_ROW_BLOCKS_GPU 65535
#define VPPO_MAX_ROW_BLOCKS_SIMT 64

/*
 * The status word of the perception kernel: a report is (row << VPPO_STATUS_CODE_BITS | code) with the
 * code (a VppoErrorCode) in the low bits, so the minimum report is the first bad row. Encoded and
 * decoded only through the macros below here and through params::status_word / params::status_report
 * in Rust (both use VPPO_STATUS_CODE_BITS).
 */
#define VPPO_STATUS_CODE_BITS 8
#define VPPO_STATUS_WORD(row, code) \
    ((long long)(((unsigned long long)(row) << VPPO_STATUS_CODE_BITS) | (unsigned long long)(code)))
#define VPPO_STATUS_ROW(word) ((int64_t)((word) >> VPPO_STATUS_CODE_BITS))
#define VPPO_STATUS_CODE(word) ((int)((word) & ((1LL << VPPO_STATUS_CODE_BITS) - 1)))
/* "No error" value of the status word: every real report (row << 8 | code) is smaller. */
#define VPPO_STATUS_CLEAR 0x7fffffffffffffffLL

/* The radix select of vppo_select: digits of this many bits, from the top of the 32-bit key. */
#define VPPO_RADIX_BITS 4
#define VPPO_RADIX_DIGITS (1 << VPPO_RADIX_BITS)

/*
 * Constants of the loss shared by the kernels and the f64 reference (src/reference/), in double.
 *   r = exp(clamp(logp - old_logp, -C, C)) and k3's d = clamp(logp_masked - old_logp, -C, C),
 *   C = VPPO_LOG_RATIO_CLAMP (SPEC sections 2 and 5);
 *   every alpha of a scope is 1 when hi - lo <= VPPO_TAS_MIN_SPREAD (SPEC section 4);
 *   mean-preserving shaping: beta_max = beta_min + (1 - beta_min) / (mean n + VPPO_TAS_MEAN_EPS);
 *   the k3 KL penalty's value is clamped to [-K, K], K = VPPO_KL_K3_CLAMP (SPEC section 12).
 */
#define VPPO_LOG_RATIO_CLAMP 20.0
#define VPPO_KL_K3_CLAMP 10.0
#define VPPO_TAS_MIN_SPREAD 1e-6
#define VPPO_TAS_MEAN_EPS 1e-8

/* Pass 1, kernels/perception.cu: one block per token row, grid-stride over rows. The logits may be
   [R, V] read through `rows` (validated on the host: in range), logits_masked [R', V] through
   `masked_rows`. */
typedef struct VppoPerceptionParams {
    const void *logits;        /* [N, V], the kernel's dtype */
    const void *logits_masked; /* [N, V], same dtype */
    const int32_t *targets;    /* [N] */
    const float *old_logp;     /* [N] */
    float *lse;                /* [N] out: logsumexp(logits[t] / tau) */
    float *lse_masked;         /* [N] out: logsumexp(logits_masked[t] / tau) */
    float *logp;               /* [N] out */
    float *logp_masked;        /* [N] out */
    float *kl;                 /* [N] out: KL(p || p_masked), may be +inf */
    float *k3;                 /* [N] out */
    float *entropy;            /* [N] out */
    float *score;              /* [N] out: the clamped visual-dependency score */
    long long *status;         /* [1] in/out: VPPO_STATUS_CLEAR or min(row << 8 | code) */
    const int64_t *rows;        /* [N] or NULL: token t reads logits row rows[t] (SPEC 10); NULL: row t */
    const int64_t *masked_rows; /* [N] or NULL: token t reads logits_masked row masked_rows[t] */
    int64_t n_tokens;          /* N */
    int64_t vocab;             /* V */
    float inv_temperature;     /* 1 / tau */
    float score_clamp;
    int32_t perception;        /* VppoPerception */
    int32_t pad0;
    /* Vocabulary parallel (SPEC 11): with `partial` set, the logits are one shard of the columns and
       targets are shard-local (target - first column; any value, out of the shard when the target's
       column is elsewhere). Each row's merged state is written to partial[t * VPPO_PARTIAL_STATE_FLOATS]
       (raw logit units, as RowState, plus flags and the target's two logits when in the shard) and
       nothing else: no output, no status (the host merges the shards' states and checks the rows). */
    float *partial;
} VppoPerceptionParams;

/* Pass 2a, kernels/select_loss.cu: one block per response: top-k mask, k_b and Sbar_b. */
typedef struct VppoSelectParams {
    const float *score;         /* [N] */
    const int32_t *cu_seqlens;  /* [B + 1] */
    uint8_t *mask;              /* [N] out: the mask of mask_by (the k_b highest scores by default) */
    int32_t *k;                 /* [B] out: k_b = ceil(top_fraction * L_b) */
    float *sbar;                /* [B] out: mean score of response b (0 when L_b = 0) */
    int64_t n_responses;        /* B */
    uint64_t frac_num;          /* top_fraction = frac_num / frac_den exactly, 0 < num <= den */
    uint64_t frac_den;
    const float *entropy;       /* [N], read only when mask_by != VPPO_MASK_BY_PERCEPTION */
    uint64_t entropy_frac_num;  /* entropy_top_fraction = num / den exactly, 0 < num <= den */
    uint64_t entropy_frac_den;
    int32_t mask_by;            /* VppoMaskBy */
    int32_t pad0;
    /* For the loss pass (NULL: not written). token_response[t] = b for every token t of response b;
       with seq_log_ratio, the GSPO modes' s_b = mean over b of logp - old_logp (0 when L_b = 0) and
       seq_selected[b] = m_b, the count of b's tokens in the mask of mask_by. */
    int32_t *token_response;    /* [N] out, or NULL */
    const float *logp;          /* [N], read only with seq_log_ratio */
    const float *old_logp;      /* [N], read only with seq_log_ratio */
    double *seq_log_ratio;      /* [B] out, or NULL */
    int32_t *seq_selected;      /* [B] out, with seq_log_ratio */
} VppoSelectParams;

/* Totals of pass 2b; every sum is taken in a fixed order, so the loss is bit-identical run to run. */
typedef struct VppoLossTotals {
    double loss;           /* pg + kl_coef * kl + logp_penalty * (-sum logp) / Z */
    double pg;             /* the clipped-surrogate part */
    double kl;             /* the aggregated KL penalty before kl_coef (0 with VPPO_KL_NONE) */
    double logp_sum;       /* sum over all tokens of logp */
    double ratio_sum;      /* sum over all tokens of r */
    int64_t n_selected;    /* tokens with mask = 1 */
    int64_t n_clipped;     /* masked tokens where a clip is active */
} VppoLossTotals;

/* The constants of one response for the per-token loss, written by vppo_loss_prep. */
typedef struct VppoLossResponse {
    double adv;           /* A'_b = alpha_b * advantages[b] (alpha_b as stored, in f32) */
    double weight;        /* d pg / d (mask_t l_t) of the tokens of b (0 when L_b = 0) */
    double seq_log_ratio; /* s_b in the GSPO modes, else 0 */
    double seq_grad;      /* gspo: m_b weight / L_b (every token's share of d pg / d s_b), else 0 */
} VppoLossResponse;

/*
 * Pass 2b, kernels/select_loss.cu, three kernels over one params struct:
 *   vppo_loss_prep (one block): TAS alpha, B', the per-response constants `responses`;
 *   vppo_loss (a grid over tiles of VPPO_LOSS_TILE_TOKENS tokens): the clipped surrogate and
 *     dloss/dlogp per token, each tile's sums into partials[tile];
 *   vppo_loss_finish (one block): the tiles' sums in tile order into totals.
 */
typedef struct VppoLossParams {
    const float *logp;          /* [N] */
    const float *old_logp;      /* [N] */
    const uint8_t *mask;        /* [N] */
    const float *sbar;          /* [B] */
    const int32_t *cu_seqlens;  /* [B + 1] */
    const float *advantages;    /* [B] */
    float *alpha;               /* [B] out */
    float *dlogp;               /* [N] out: dloss/dlogp */
    VppoLossTotals *totals;     /* [1] out */
    const double *seq_log_ratio; /* [B] the GSPO modes' s_b (vppo_select's seq_log_ratio) */
    const int32_t *seq_selected; /* [B] the GSPO modes' m_b (vppo_select's seq_selected) */
    const float *ref_logp;      /* [N], read only when kl_penalty != VPPO_KL_NONE */
    const int32_t *token_response; /* [N] the response of each token (vppo_select's token_response) */
    VppoLossResponse *responses;   /* [B] scratch: written by vppo_loss_prep, read by vppo_loss */
    VppoLossTotals *partials;      /* [ceil(N / VPPO_LOSS_TILE_TOKENS)] scratch: each tile's sums */
    int64_t n_tokens;           /* N */
    int64_t n_responses;        /* B */
    int64_t group_size;         /* G, the scope of VPPO_SCOPE_GROUP */
    /* The config in double, as the caller gave it: 1 - 0.2f is not 1 - 0.2, and the loss pass works
       in double so that it agrees with the f64 reference to ~1e-15 given the same inputs. */
    double token_normalizer;    /* Z */
    double response_normalizer; /* B' of the seq modes; 0: the batch's own count of non-empty responses */
    double beta_min;
    double beta_max;            /* used by VPPO_SHAPING_LINEAR */
    double range_lo;            /* caller-given (lo, hi) when has_range */
    double range_hi;
    double eps_low;
    double eps_high;
    double dual_clip;           /* used when has_dual_clip */
    double logp_penalty;
    double kl_coef;             /* beta >= 0 of the KL penalty */
    int32_t shaping;            /* VppoShaping */
    int32_t scope;              /* VppoScope */
    int32_t aggregation;        /* VppoAggregation */
    int32_t has_range;
    int32_t has_dual_clip;
    int32_t loss_type;          /* VppoLossType */
    int32_t kl_penalty;         /* VppoKlPenalty */
    int32_t pad0;
} VppoLossParams;

/* Pass 3, kernels/backward.cu: dloss/dlogits[t, v] = g_t (1[v = y] - softmax(a_t)_v) / tau, over
   the R rows of logits: row rows[t] is token t's, every other row is zero. */
typedef struct VppoBackwardParams {
    const void *logits;      /* [R, V], the kernel's input dtype; may alias grad (in place) */
    const float *lse;        /* [N] from pass 1 */
    const float *dlogp;      /* [N] g_t from pass 2b */
    const int32_t *targets;  /* [N] */
    void *grad;              /* [R, V] out, the kernel's output dtype */
    const int64_t *rows;     /* [N] strictly increasing, in [0, R) (validated on the host), or NULL */
    int64_t n_rows;          /* R (= N without rows) */
    int64_t n_tokens;        /* N */
    int64_t vocab;           /* V */
    float inv_temperature;   /* 1 / tau */
    int32_t pad0;
    /* kl_penalty = full (SPEC section 12), read by the vppo_backward_full_* kernels only: the row adds
       d_t p_v ((a_v - lse_t) - (c_v - lse_ref_t) - kl_t) / tau, c = ref_logits[row] / tau. */
    const void *ref_logits;  /* [R, V], the input dtype, read through rows as logits is */
    const float *lse_ref;    /* [N] logsumexp(ref_logits[row] / tau) from the reference launch of pass 1 */
    const float *ref_kl;     /* [N] kl_t = KL(pi || pi_ref) */
    const float *dref_kl;    /* [N] d_t = dloss/dkl_t = kl_coef w_t */
} VppoBackwardParams;

/* The backward of the general KL op (vppo.torch.kl, SPEC section 13), kernels/kl_div.cu. For token t,
   with a = p_logits[p_row(t)] / tau, b = q_logits[q_row(t)] / tau, p = softmax(a), q = softmax(b),
   kl_t = KL(p || q) and u_t = grad_kl[t]:
       grad_p[v] = u_t p_v ((a_v - lse_p) - (b_v - lse_q) - kl_t) / tau,  grad_q[v] = u_t (q_v - p_v) / tau.
   lse_p, lse_q and kl come from the forward (the perception kernel in partial mode). Rows of either
   gradient that no token reads are written as zeros. */
typedef struct VppoKlDivBackwardParams {
    const void *p_logits;    /* [R, V], the kernel's dtype */
    const void *q_logits;    /* [R', V], same dtype */
    const float *lse_p;      /* [N] logsumexp(a) */
    const float *lse_q;      /* [N] logsumexp(b) */
    const float *kl;         /* [N] KL(p || q), finite */
    const float *grad_kl;    /* [N] u_t, the upstream gradient */
    void *grad_p;            /* [R, V] out, the kernel's dtype */
    void *grad_q;            /* [R', V] out, the kernel's dtype */
    const int64_t *p_rows;   /* [N] strictly increasing, in [0, R), or NULL (R = N, row t) */
    const int64_t *q_rows;   /* [N] strictly increasing, in [0, R'), or NULL (R' = N, row t) */
    int64_t n_p_rows;        /* R */
    int64_t n_q_rows;        /* R' */
    int64_t n_tokens;        /* N */
    int64_t vocab;           /* V */
    float inv_temperature;   /* 1 / tau */
    int32_t pad0;
} VppoKlDivBackwardParams;

#endif /* VPPO_PARAMS_H */
