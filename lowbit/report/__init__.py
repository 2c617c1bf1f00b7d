"""Evidence reports: `lowbit report convergence` (or `python -m lowbit.report convergence`).

    lowbit report convergence                       # ladder, optim and sft arms, CPU defaults
    lowbit report convergence --preset resolve      # sized to resolve ~1 % gaps: reports/convergence/
    lowbit report convergence --preset fourbit      # Stable-SPAM's 4-bit table: reports/fourbit-optimizers/
    lowbit report convergence --arms ladder --seeds 5 --steps 400
    lowbit report convergence --smoke               # 5 steps per run on a micro model
    lowbit report continual [--seeds N] [--quick]   # AdamW vs EWC vs CLASSP on tasks in sequence

Modules: `arms` (what each arm runs), `runner` (one run through `lowbit.train`, reused when
finished), `spikes` (the injected-gradient-spike loop), `sft_tasks` (strong / weak prior tasks),
`variants` (nvfp4 without RHT / SR), `noise` (seed band and verdicts), `claims` (each paper's
claims judged on cells of runs), `merging` (the WSM merge arm), `wgrad_noise` (bias and noise of
one Linear's weight gradient per recipe), `plots`, `convergence` (analysis and the markdown
report), `cli`; `continual` (the continual-learning harness, EWC) and `continual_report` (its
command, table and plot).
"""
