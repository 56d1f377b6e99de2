"""Notebook 3 of the course: counting LoRA's trainable parameters (E5), and Table 5's fixed budget."""

from .nb_common import HOW_TO_WORK, code, md, setup_code

CELLS = [
    md(
        r"""
# 3 · Counting what LoRA trains (E5: 10 points)

LoRA's case rests on arithmetic: train $r\,(d + k)$ numbers instead of $d\,k$. In **`lora_counting.py`** you write
the three functions that do this arithmetic, exactly, with Python integers:

- **E5** `lora_params(d_out, d_in, r)`, `lora_transformer_params(n_layers, ranks, shapes)` and
  `config_lora_params(cfg, lora)`.

Then you use them on GPT-3 175B, and on the fixed parameter budget of the paper's Section 7.1.

**Sources**, cited as [key, where]:

- **[LoRA]** E. J. Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv:2106.09685 (2021):
  Section 4.1 ($B \in \mathbb{R}^{d\times r}$, $A \in \mathbb{R}^{r\times k}$), Section 4.2 (checkpoint size),
  Section 5.1 ($|\Theta| = 2\times\hat L_{LoRA}\times d_{model}\times r$), Table 4 and Appendix D.4 (GPT-3's
  configurations), Section 7.1 and Table 5 (a fixed budget), Section 8.
- **[GPT-3]** T. Brown et al., arXiv:2005.14165 (2020): Table 2.1 (175B: 96 layers, $d_{model} = 12{,}288$),
  Section 2.1 ($d_{ff} = 4\,d_{model}$).
- Notebook `01_parameter_counts` recomputes every count the paper prints, with more sources.
"""
    ),
    md(HOW_TO_WORK),
    setup_code(
        """
        from fractions import Fraction
        from numbers import Integral

        import lora_np.counting
        from lora_np import LoraConfig, ModelConfig
        from lora_np.counting import block_shapes, count_arrays, gpt_params
        from lora_np.lora import init_lora  # lora_np's own, so that this notebook does not depend on your E3
        from lora_counting import config_lora_params, lora_params, lora_transformer_params
        """
    ),
    md(
        r"""
## 1. One weight

A frozen $W_0$ of shape `(d_out, d_in)` holds $d_{out}\,d_{in}$ numbers. Its adapter holds $A$ `(r, d_in)` and
$B$ `(d_out, r)` [LoRA, 4.1]:

$$N_{LoRA} = r\,d_{in} + d_{out}\,r = r\,(d_{in} + d_{out}).$$

`lora_params(d_out, d_in, r)` returns that as a Python `int`. It refuses, with an error naming the argument:
a value that is not an integer (`TypeError`; `True` is not a count), a value below 1 (`ValueError`), and a rank
$r > \min(d_{out}, d_{in})$ (`ValueError`: $BA$ cannot have a higher rank than that, so the extra numbers buy nothing).
`lora_np.config.check_int(name, value)` does the first two checks.
"""
    ),
    code(
        r"""
        d = 1000
        print(f"W0, {d} x {d}: {d * d:>9,} numbers")
        for r in (1, 2, 4, 8):
            n = lora_params(d, d, r)
            print(f"r = {r}: A ({r} x {d}) + B ({d} x {r}) = {n:>6,} numbers, {n / (d * d):.1%} of W0, "
                  f"{d * d / n:g}x fewer")
            assert isinstance(n, Integral) and not isinstance(n, bool) and n == r * d + d * r  # any integer type
            assert Fraction(d * d, n) == Fraction(d, 2 * r)  # a square d x d weight: d / (2r) times fewer
        assert lora_params(1000, 1000, 4) == 4 * 1000 + 1000 * 4 == 8_000

        # not square: an MLP weight W_1 of shape (d_mlp, d_model) = (4096, 1024)
        assert lora_params(4096, 1024, 8) == 8 * 1024 + 4096 * 8
        assert lora_params(4096, 1024, 1024) == 1024 * (1024 + 4096)  # r = min(d_out, d_in) is allowed
        """
    ),
    code(
        r"""
        for args, error in (((4096, 1024, 1025), ValueError), ((10, 10, 0), ValueError), ((10, 10, 2.0), TypeError),
                            ((10, True, 2), TypeError)):
            try:
                lora_params(*args)
            except error as e:
                print(f"lora_params{args}: {error.__name__}: {e}")
            else:
                raise AssertionError(f"lora_params{args} must raise {error.__name__}")
        """
    ),
    md(
        r"""
## 2. A whole transformer

Every block carries the same adapters, so for $L$ blocks and a rank $r_t$ for each adapted matrix $t$:

$$N = L \sum_{t} r_t\,(d_{in,t} + d_{out,t}).$$

With one rank on $\hat n$ square $d_{model}\times d_{model}$ matrices a block this is the paper's
$|\Theta| = 2\times\hat L_{LoRA}\times d_{model}\times r$ with $\hat L_{LoRA} = \hat n L$ [LoRA, 5.1].

`lora_transformer_params(n_layers, ranks, shapes)` takes the ranks as a dict, e.g. `{"W_q": 8, "W_v": 8}`, and the
shapes as a dict name $\to$ `(d_out, d_in)`; `lora_np.counting.block_shapes(d_model, d_mlp)` gives the six of a GPT
block. A name in `ranks` that is not in `shapes`, or an empty `ranks`, raises `ValueError`.
`config_lora_params(cfg, lora)` is the count for a lora_np model: rank `lora.r` on each of `lora.targets`.

**GPT-3 175B** has 96 layers with $d_{model} = 12{,}288$ and $d_{ff} = 4\,d_{model}$ [GPT-3, Table 2.1, Section 2.1].
Its Table 4 configuration $r_q = r_v = 8$ [LoRA, D.4], computed by your function and, independently, by hand:
"""
    ),
    code(
        r"""
        GPT3 = block_shapes(12288, 4 * 12288)
        n_gpt3 = lora_transformer_params(96, {"W_q": 8, "W_v": 8}, GPT3)
        by_hand = 96 * 2 * 8 * (12288 + 12288)  # 96 layers x 2 matrices x r·(d_in + d_out)
        print(f"GPT-3 175B, r = 8 on W_q, W_v: {n_gpt3:,} = {n_gpt3 / 1e6:.1f}M trainable numbers")
        assert isinstance(n_gpt3, Integral) and n_gpt3 == by_hand == 2 * 96 * 12288 * 8 * 2  # the paper's |Θ| = 2·L̂·d·r
        assert round(n_gpt3 / 1e6, 1) == 37.7  # Table 4 prints "37.7M"

        n_r4 = lora_transformer_params(96, {"W_q": 4, "W_v": 4}, GPT3)
        print(f"GPT-3 175B, r = 4 on W_q, W_v: {n_r4:,} = {n_r4 / 1e6:.1f}M trainable numbers")
        assert 2 * n_r4 == n_gpt3

        whole = gpt_params(96, 12288, 4 * 12288, 50257, 2048)  # every weight of the model, by formula
        print(f"the whole model: {whole:,} numbers; r = 8 adapters are 1/{whole / n_gpt3:,.0f} of it, "
              f"r = 4 adapters 1/{whole / n_r4:,.0f}")

        # a last cross-check, against lora_np's own implementation
        assert n_gpt3 == lora_np.counting.lora_transformer_params(96, {"W_q": 8, "W_v": 8}, GPT3)
        """
    ),
    md(
        r"""
The paper's "roughly 10,000×" smaller checkpoint (from 350GB to 35MB) is for $r = 4$ on $W_q, W_v$ [LoRA, 4.2],
the second line printed above. Now the formula against real arrays: adapters on all six weights of a small
lora_np model (including the non-square MLP weights), counted array by array.
"""
    ),
    code(
        r"""
        cfg = ModelConfig(vocab_size=32, context_length=16, d_model=32, n_heads=4, n_layers=2, d_mlp=128)
        lora = LoraConfig(r=4, targets=("W_q", "W_k", "W_v", "W_o", "W_1", "W_2"))
        counted = count_arrays(init_lora(cfg, lora, seed=0))  # the sizes of the arrays themselves
        D, M, L, r = 32, 128, 2, 4
        print(f"config_lora_params: {config_lora_params(cfg, lora):,}; arrays: {counted:,}")
        assert config_lora_params(cfg, lora) == counted == L * (4 * r * (D + D) + 2 * r * (D + M))
        assert config_lora_params(cfg, LoraConfig(r=4)) == L * 2 * r * (D + D)  # the default: W_q, W_v
        """
    ),
    code('check("E5")'),
    md(
        r"""
## 3. Which weights, at a fixed budget? (Section 7.1)

"Given a limited parameter budget, which types of weights should we adapt with LoRA to obtain the best performance on
downstream tasks?" The paper fixes a budget of 18M on GPT-3 175B: $r = 8$ on one type of attention weight, $r = 4$ on
two, $r = 2$ on all four, in all 96 layers [LoRA, 7.1]. Table 5 gives validation accuracy on WikiSQL and MultiNLI;
the first column states the seed-to-seed fluctuation, ±0.5 % and ±0.1 %.

In the cell below, compute the budget of each column of Table 5 with your `lora_transformer_params`, as a dict
`budgets` from the column's name to its count.
"""
    ),
    code(
        r"""
        TABLE5 = {  # [LoRA, Table 5]: column -> (ranks, WikiSQL %, MultiNLI %)
            "W_q": ({"W_q": 8}, 70.4, 91.0),
            "W_k": ({"W_k": 8}, 70.0, 90.8),
            "W_v": ({"W_v": 8}, 73.0, 91.0),
            "W_o": ({"W_o": 8}, 73.2, 91.3),
            "W_q,W_k": ({"W_q": 4, "W_k": 4}, 71.4, 91.3),
            "W_q,W_v": ({"W_q": 4, "W_v": 4}, 73.7, 91.3),
            "W_q,W_k,W_v,W_o": ({"W_q": 2, "W_k": 2, "W_v": 2, "W_o": 2}, 73.7, 91.7),
        }
        NOISE = (0.5, 0.1)  # the seed-to-seed fluctuation on WikiSQL and MultiNLI, in points

        ### BEGIN SOLUTION
        budgets = {name: lora_transformer_params(96, ranks, GPT3) for name, (ranks, _, _) in TABLE5.items()}
        ### END SOLUTION
        assert set(budgets) == set(TABLE5) and len(set(budgets.values())) == 1  # one budget for every column
        budget = budgets["W_q"]
        print(f"every column: {budget:,} trainable numbers = {budget / 1e6:.2f}M (the paper: 18M)")
        assert budget == 96 * 8 * (12288 + 12288) and int(budget / 1e6) == 18

        best = [max(row[i] for row in TABLE5.values()) for i in (1, 2)]
        header = f"{'WikiSQL':>10s}{'behind best':>13s}{'MultiNLI':>10s}{'behind best':>13s}"
        print(f"\n{'weights':18s}{'ranks':>9s}{header}")
        behind = {}
        for name, (ranks, *acc) in TABLE5.items():
            behind[name] = [round(b - a, 1) for a, b in zip(acc, best)]  # rounded: the table has one decimal
            marks = ["*" if g <= n else " " for g, n in zip(behind[name], NOISE)]
            cells = "".join(f"{a:>10.1f}{g:>9.1f}{m:>4s}" for a, g, m in zip(acc, behind[name], marks))
            print(f"{name:18s}{'r = ' + str(next(iter(ranks.values()))):>9s}{cells}")
        print("* within the seed fluctuation (±0.5 on WikiSQL, ±0.1 on MultiNLI) of the best column")
        for name in ("W_q", "W_k"):  # worse than the best by more than the noise, on both tasks
            assert all(g > n for g, n in zip(behind[name], NOISE))
        assert behind["W_q,W_k,W_v,W_o"] == [0.0, 0.0] and behind["W_q,W_v"] == [0.0, 0.4]
        assert [round(a - b, 1) for a, b in zip(TABLE5["W_q,W_v"][1:], TABLE5["W_o"][1:])] == [0.5, 0.0]
        """
    ),
    md(
        r"""
**Inline Question.** You have the 18M budget on GPT-3 and must choose which attention weights to adapt. What does
Table 5 tell you, and how strong is its evidence? Use the table printed above; be precise about what is within the
seed fluctuation and what is not.
"""
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
Spread the budget: adapt several kinds of attention weight at a lower rank rather than one kind at a higher rank. At
the same budget (every column has the same count, printed above), $W_q$ alone and $W_k$ alone at $r = 8$ are the
worst columns on both tasks, behind the best by more than the seed fluctuation; $W_q, W_v$ at $r = 4$ and all four
at $r = 2$ are the best [LoRA, 7.1, Table 5]. The paper's reading: "even a rank of four captures enough information in
$\Delta W$ such that it is preferable to adapt more weight matrices than adapting a single type of weights with a
larger rank" [LoRA, 7.1]. I would take $W_q, W_v$ at $r = 4$ or all four at $r = 2$.

How strong: the evidence against $W_q$ alone or $W_k$ alone is clear. The ranking at the top is not. All four at
$r = 2$ ties $W_q, W_v$ on WikiSQL and is ahead by 0.4 on MultiNLI, beyond that task's ±0.1. $W_o$ alone at $r = 8$
ties $W_q, W_v$ on MultiNLI and is 0.5 behind on WikiSQL, no more than that task's ±0.5, so Table 5 does not separate
$W_q, W_v$ from $W_o$ alone. The caption's "adapting both $W_q$ and $W_v$ gives the best performance overall" is a
judgment across the two tasks, and the paper's other experiments adapt $W_q, W_v$ "in most experiments for
simplicity" [LoRA, 5.1]. It is also one model (GPT-3 175B), two tasks, one budget, and attention weights only: the
MLP is left out by design [LoRA, 4.2]. The paper itself lists choosing the weights as open: "we mostly depend on
heuristics to select the weight matrices to apply LoRA to" [LoRA, 8].
### END SOLUTION
"""
    ),
    md(
        r"""
## Summary

- One weight: $r\,(d_{in} + d_{out})$ against $d_{out}\,d_{in}$; $d/(2r)$ times fewer for a square $d\times d$ weight.
- A transformer: $L\sum_t r_t\,(d_{in,t} + d_{out,t})$, the paper's $2\hat L_{LoRA}\,d_{model}\,r$; GPT-3 with
  $r_q = r_v = 8$ gives Table 4's 37.7M, computed above.
- At a fixed budget, Table 5 favours several matrices at a low rank over $W_q$ or $W_k$ alone; among the best columns
  it does not decide.

Next: notebook 4 trains the adapters one step, with your `trainable_names` and `AdamW` (E6).
"""
    ),
]
