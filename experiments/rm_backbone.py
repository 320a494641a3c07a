"""
Can a larger reward-model backbone, built without labels, give PbPO's linear head features that
rank held-out pairs? The measurement, and the builds tried (the ones that read answers marked).

What toy.py builds into out/toy/rm, the default RM backbone of a toy run, is the ordinal read-out
anchored on the SFT policy's own worked answers, `--objective=ordinal --anchor=self
--estimates=0.8 --batch_size=16 --steps=1400` (the other knobs at their defaults;
toy.train_rm_backbone is this build, weight for weight, which a test checks). The backbone reads
a problem and a crowd's answer (80% estimates), its number sometimes replaced, and says per d_k
"is this number within d_k of the anchor?"; the anchor is the number the SFT policy's own greedy
answer ends with when its response is started with the question's first number, so that it
works the problem (toy.self_anchors): its arithmetic, right or wrong (on the build's 20,000
fresh problems, seed 0: 95.7% right and 99.3% within 2 in `standard`; 22.3% right and 80.1%
within 2 in `rare`, whose SFT rarely saw a worked answer). The targets read no problem's answer,
gold reward or oracle: self-training on the policy's own outputs. Its numbers are in the last
table below; the harness measures the anchors against the answers after the build (`anchors`
in its output), which the build never reads. The shared pieces (the crowd's answers, the
replaced number, the grown model, the top-block φ, the anchors) live in toy.py.

Anchored instead on each problem's true answer (`--anchor=answer`, the default of the earlier
rounds: a correctness label for each of its 44,800 training documents, which no arm's oracle
budget could carry), or on a second crowd writer's worked answer (`--anchor=worked`: the answer
with the crowd's 10% of slips, a noisy answer key, so a label in all but name), the same build
ranks 0.858 / 0.882 and 0.894 / 0.929 on seed 0; those are what reading the answers buys, and
neither is the toy's. Anchored on the number the document itself stated before it was replaced
(--anchor=document) it falls to 0.721 ± 0.045 (standard) and 0.776 ± 0.039 (rare), seed 0, 2
threads. The replaced-number detector (`--objective=detect --steps=700`, toy.py's backbone
before) reaches 0.837 / 0.824 (`experiments/diagnose.py`, 763 pairs).

The probe is PbPO's reward model as the code has it: `reward.RewardModel.phi` (the backbone's final
normed hidden state at the last response token, L2-normalised), a Bradley–Terry head fit on the
toy preference file (train prompts), scored on held-out gold pairs (two temperature-1 SFT samples
per validation prompt, ties dropped: `experiments.diagnose.gold_pairs`). The accuracy comes with a
95% interval (normal approximation) and broken down by the kinds of the two responses (a guess
"I think it is about N" or a worked answer): a guess-against-guess pair is ranked by how close
each number is to the answer, which no feature of the response's style tells.

Builds (each from fresh problems, disjoint from the train, validation and held-out prompts, on a
random stream of its own; no gold reward, no oracle call; only the ordinal objective's
--anchor=answer and --anchor=worked targets read each problem's answer, exactly or nearly):

  --objective=detect   the SFT policy grown by --extra identity-initialised blocks on top (the
                       SFT's blocks and embedding frozen), trained to tell a pretraining crowd's
                       answers (worked answers with slips, estimates t ± Laplace(--scale)) from
                       the same answers with the final number replaced by another document's
                       (ELECTRA's replaced-token detection, on the answer's number), read at the
                       last token through a linear layer dropped after the build. --hard: that
                       share of the replaced numbers is 1 to 9 off the real one instead (as the
                       SFT's guesses are); --short: the answer cut to its '#### N' line;
                       --warm: that many steps of language modelling on the problems' clean
                       worked answers first (the grown blocks only). The schedule's knobs
                       (--lr_floor, --clip, --wd, --ema) apply to every build.
                       --estimates: the share of the crowd's answers that are estimates (0.5),
                       --slips: of its worked answers with a slip (0.1); --restarts=R: R
                       initialisations (new blocks, read-out and batch order) train --trial steps
                       each, and the one that scores best on --check fresh problems held back from
                       training goes on to the end (--choose=loss: the lowest detection loss on
                       them; order: the most pairs of estimates, 1 to 9 off, whose nearer one the
                       read-out scores higher); no label.
  --objective=ordinal  the same text, K read-out logits instead of one: logit k says "the stated
                       number is within d_k of the anchor" (--thresholds, d_k = 0, 1, 2, 4, 8), a
                       binary cross-entropy each; a --near share of the replaced numbers is 1 to
                       --near_max off the anchor, the rest another document's. --anchor: the
                       number the SFT policy's own worked answer ends with (self, the toy's
                       build), the problem's answer (a label), a second writer's worked answer
                       (worked: a noisy answer key), or the document's own number before it was
                       replaced (document).
  --objective=pairwise the same text, a Bradley–Terry loss: each answer above its replaced copy.
  --objective=distance the same text, the read-out regressed on log(1 + how far the number moved).
  --objective=lm       the same grown model, language modelling on worksheets: one writer
                       answers --turns problems, every answer off by the writer's own amount
                       (0 to 9), so turn 1's error predicts the later turns' numbers.

Only the last token's φ is trained, so the detector's build runs the top block for that token
alone (--top_only, on by default: the same φ, checked against the full forward by the test; its
keys and values still span the sequence): 150 steps took 8 s against 11 s on 2 threads.

  python -m experiments.rm_backbone --toy_dir=out/toy                      # SFT features only
  python -m experiments.rm_backbone --toy_dir=out/toy --steps=700          # + a detect build
  python -m experiments.rm_backbone --toy_dir=out/toy_rare --rare --steps=700 --seed=1
  python -m experiments.rm_backbone --objective=ordinal --anchor=self --estimates=0.8 \
      --batch_size=16 --steps=1400 --threads=2       # toy.py's recipe
  python -m experiments.rm_backbone --objective=ordinal --anchor=answer --estimates=0.8 \
      --batch_size=16 --steps=1400 --threads=2       # the same, anchored on the answers (a label)
  python -m experiments.rm_backbone --steps=700 --threads=2     # the detector, toy.py's before
  python -m experiments.rm_backbone --toy_dir=out/toy --objective=lm --steps=1500

One thread by default (--threads), so the times compare across machines of any core count.

Measured on a toy built before c943d2b (seed 0; held-out accuracy ± 95% half-width, n
pairs; guess-guess in brackets):

  setting   SFT features (2 x 64)     detect, 400 steps (4 x 64)   detect, longer
  standard  0.712 ± 0.045 (392; 0.51)  0.827 ± 0.037 (0.74)         0.862 ± 0.034 at 1200 steps
  rare      0.487 ± 0.046 (450; 0.50)  0.696 ± 0.043 (0.69)         0.833 ± 0.034 at 1500 steps
  lm (worksheets), standard, 1500 steps: 0.681 ± 0.046 (0.47)

Measured on the toy built at c943d2b (the same probe; batch 32 real + 32 replaced, lr 3e-3,
2 grown blocks; seed s changes the fresh problems, the initialisation and the held-out pairs):

  setting   build                               s  steps  held-out acc.       guess-guess
  standard  SFT features                        0      -  0.742 ± 0.044 (387)  0.50
  standard  SFT features                        1      -  0.727 ± 0.045 (377)  0.48
  standard  detect, full forward                0    400  0.806 ± 0.039        0.73
  standard  detect, --hard=0.5                  0    400  0.798 ± 0.040        0.74
  standard  detect, --short                     0    400  0.736 ± 0.044        0.50
  standard  detect, --lr=1e-2                   0    400  0.659 ± 0.047        0.60
  standard  distance                            0    400  0.695 ± 0.046        0.54
  standard  distance, --hard=0.5                0    400  0.716 ± 0.045        0.62
  standard  detect, top only                    0    700  0.840 ± 0.037        0.74
  standard  detect, top only, 2 threads         0    700  0.837 ± 0.037        0.76
  standard  detect, top only                    1    700  0.881 ± 0.033        0.80
  standard  detect, top only                    0    900  0.814 ± 0.039        0.70
  standard  pairwise, top only                  0    700  0.783 ± 0.041        0.74
  rare      SFT features                        0      -  0.487 ± 0.046 (450)  0.50
  rare      SFT features                        1      -  0.526 ± 0.046 (443)  0.53
  rare      detect, --lr=1e-2, full forward     0    400  0.644 ± 0.044        0.64
  rare      detect, top only                    0    700  0.836 ± 0.034        0.84
  rare      detect, top only                    1    700  0.808 ± 0.037        0.82
  rare      detect, top only                    0    900  0.758 ± 0.040        0.75
  rare      detect, --hard=0.3                  0    700  0.636 ± 0.044        0.63
  rare      detect, --hard=0.3                  1    700  0.799 ± 0.037        0.80
  rare      detect, --scale=1.5                 0    700  0.800 ± 0.037        0.81
  rare      detect, --scale=1.5                 1    700  0.720 ± 0.042        0.72
  rare      detect, --scale=5                   0    700  0.733 ± 0.041        0.74
  rare      detect, --scale=5                   1    700  0.695 ± 0.043        0.69
  rare      detect, --identity=0                0    700  0.744 ± 0.040        0.75
  rare      detect, --identity=0                1    700  0.754 ± 0.040        0.76
  rare      detect, --extra=3                   0    700  0.744 ± 0.040        0.75
  rare      detect, --extra=3                   1    700  0.813 ± 0.036        0.83
  rare      detect, --warm=200                  0    600  0.684 ± 0.043        0.68
  rare      detect, --warm=200                  1    600  0.722 ± 0.042        0.72
  rare      pairwise, top only                  0    700  0.647 ± 0.044        0.64

In the rare setting nearly every held-out pair is guess against guess (389 of 450), so its accuracy
is how well the backbone reads a guess's distance from the answer. Time: 700 top-only steps, the
build with its 20,000 fresh problems, took 40 s on 2 threads (the machine shared with other work;
150 steps: 8 s top only against 11 s full forward, 2 threads). So a detect build of 700 steps (the
other knobs at their defaults) fits the 40 s a toy build may spend, and comes near the target
(standard 0.840 and 0.881, rare 0.836 and 0.808 over two seeds), but reaches 0.85 in both settings
on neither seed; and a build's accuracy moves by up to 0.08 with its seed or step count (rare: 0.836
at 700 steps, 0.758 at 900), by 0.16 between the two seeds of --hard=0.3: whether the grown blocks
learn the sum in time varies from run to run. Hard negatives, a Bradley–Terry or a distance loss, a
higher learning rate, answers cut to their last line, a narrower or a wider crowd (--scale 1.5, 5),
new blocks that do not start as the identity and a third grown block (78 s on one thread), and 200
steps of language modelling on worked answers before 600 of detection, all did worse. It is not
wired as the toy's default.

Measured on the toy built at 0814ae6 (the same probe; seeds 0, 1, 2 paired across arms; the
schedule of every arm: linear warm-up over 5% of the steps, cosine down to --lr_floor of the peak
3e-3, gradients clipped to norm 1, AdamW weight decay 0.1, unless the arm says otherwise):

  setting   detect, top only         s=0            s=1            s=2            mean   min
  standard  700 steps (default)      0.840 ± 0.037  0.881 ± 0.033  0.828 ± 0.038  0.849  0.828
  standard  700 steps, --ema=0.99    0.829 ± 0.037  0.878 ± 0.033  0.809 ± 0.040  0.839  0.809
  standard  700 steps, --lr_floor=0  0.845 ± 0.036  0.857 ± 0.035  0.801 ± 0.040  0.834  0.801
  standard  350, --batch_size=64     0.822 ± 0.038  0.825 ± 0.038  0.775 ± 0.042  0.807  0.775
  standard  1400, --batch_size=16    0.835 ± 0.037  0.862 ± 0.035  0.851 ± 0.036  0.849  0.835
  standard  700 steps, --wd=0        0.832 ± 0.037  0.873 ± 0.034  0.814 ± 0.039  0.840  0.814
  rare      700 steps (default)      0.836 ± 0.034  0.808 ± 0.037  0.670 ± 0.044  0.771  0.670
  rare      700 steps, --ema=0.99    0.827 ± 0.035  0.808 ± 0.037  0.656 ± 0.045  0.764  0.656
  rare      700 steps, --lr_floor=0  0.782 ± 0.038  0.770 ± 0.039  0.677 ± 0.044  0.743  0.677
  rare      350, --batch_size=64     0.793 ± 0.037  0.661 ± 0.044  0.606 ± 0.046  0.687  0.606
  rare      1400, --batch_size=16    0.780 ± 0.038  0.720 ± 0.042  0.764 ± 0.040  0.755  0.720
  rare      700 steps, --wd=0        0.773 ± 0.039  0.804 ± 0.037  0.683 ± 0.044  0.753  0.683

The default build's seeds 0 and 1 are those of the table above, to the third digit; its seed 2
falls to 0.670 in the rare setting, so its spread across seeds is 0.17 there, not 0.08. None of
the five changes reaches 0.85 in either setting's minimum. An average of the weights (--ema), a
schedule that ends at 0 instead of a tenth, and no weight decay each lower both settings' means
over seeds, so the end of training is not where the runs part; twice the batch at half the steps
is worse on all six runs, and half the batch at twice the steps (the same documents) lifts the rare
minimum (0.670 -> 0.720) and the standard minimum (0.828 -> 0.835) but lowers the rare mean (0.771
-> 0.755). The number of updates matters more than the documents an update sees; the seed-to-seed
swing stays 0.06 to 0.19 in the rare setting whatever the schedule. Time: 49 to 58 s a build on
one thread, two probes at once on the 2-core machine (the --lr_floor=0 and --wd=0 runs, 65 to
124 s, shared the machine with other work), so a 2-thread build is near the 40 s the earlier
round measured.

Measured on the same toy (the default build gives round 3's numbers again: 0.840 standard seed 0,
0.670 rare seed 2), 700 steps unless said, one thread, two probes at once on a 2-core machine that
another job shared (so the seconds are high and vary: 53 to 128 s for the same 700 steps);
restarts: the steps are the chosen run's, and each restart that is not chosen adds --trial more.

  setting   build                                  s  steps  held-out acc.  guess-guess   s
  standard  detect (default)                       0    700  0.840 ± 0.037  0.74         54
  standard  ordinal                                0    700  0.811 ± 0.039  0.66         58
  standard  ordinal                                1    700  0.881 ± 0.033  0.78         91
  standard  ordinal                                2    700  0.833 ± 0.038  0.73         85
  standard  restarts 2, trial 100, by loss         0    700  0.840 ± 0.037  0.74         57
  standard  restarts 2, trial 100, by loss         1    700  0.881 ± 0.033  0.80         80
  standard  restarts 2, trial 100, by loss         2    700  0.780 ± 0.042  0.67         58
  standard  restarts 2, trial 100, by order        2    700  0.828 ± 0.038  0.70         97
  standard  restarts 2, trial 200, by loss         2    600  0.780 ± 0.042  0.68        112
  standard  --estimates=0.8                        0    700  0.811 ± 0.039  0.74         92
  standard  --estimates=0.8                        1    700  0.846 ± 0.036  0.75         82
  standard  --estimates=0.8                        2    700  0.761 ± 0.043  0.72         87
  standard  --estimates=0.65                       2    700  0.830 ± 0.038  0.74         60
  standard  --lr=5e-3                              2    700  0.846 ± 0.036  0.71         90
  standard  ordinal, --estimates=0.8               0    700  0.819 ± 0.038  0.72         61
  standard  ordinal, --estimates=0.8               1    700  0.844 ± 0.037  0.74         64
  standard  ordinal, --estimates=0.8               2    700  0.793 ± 0.041  0.65         91
  standard  ordinal, --estimates=0.7               0    700  0.811 ± 0.039  0.70         92
  standard  ordinal, --estimates=0.7               2    700  0.809 ± 0.040  0.67         69
  standard  ordinal, --estimates=0.8 --slips=0.5   2    700  0.825 ± 0.038  0.78         50
  standard  ordinal, --estimates=0.8, batch 16     0   1400  0.832 ± 0.037  0.74         47
  standard  ordinal, --estimates=0.8, batch 16     1   1400  0.878 ± 0.033  0.86         50
  standard  ordinal, --estimates=0.8, batch 16     2   1400  0.870 ± 0.034  0.83         48
  standard  the same, 2 threads                    0   1400  0.858 ± 0.035  0.79         36
  standard  the same, 2 threads                    1   1400  0.873 ± 0.034  0.87         40
  standard  the same, 2 threads                    2   1400  0.870 ± 0.034  0.85         38
  rare      detect (default)                       2    700  0.670 ± 0.044  0.67        128
  rare      ordinal                                0    700  0.782 ± 0.038  0.79         63
  rare      ordinal                                1    700  0.666 ± 0.044  0.66         70
  rare      ordinal                                2    700  0.734 ± 0.041  0.72         57
  rare      ordinal, d_k 0-8, 10, 12, --near=0.8   2    700  0.638 ± 0.045  0.62         53
  rare      restarts 2, trial 100, by loss         0    700  0.836 ± 0.034  0.84         59
  rare      restarts 2, trial 100, by loss         1    700  0.815 ± 0.036  0.83         59
  rare      restarts 2, trial 100, by loss         2    700  0.764 ± 0.040  0.77         60
  rare      restarts 2, trial 100, by order        2    700  0.670 ± 0.044  0.67        110
  rare      restarts 2, trial 200, by loss         2    600  0.716 ± 0.042  0.71        119
  rare      --estimates=0.8                        0    700  0.796 ± 0.037  0.80         83
  rare      --estimates=0.8                        1    700  0.831 ± 0.035  0.83         88
  rare      --estimates=0.8                        2    700  0.768 ± 0.040  0.76         87
  rare      --estimates=0.65                       2    700  0.663 ± 0.044  0.66         63
  rare      --lr=5e-3                              2    700  0.638 ± 0.045  0.64        101
  rare      ordinal, --estimates=0.8               0    700  0.829 ± 0.035  0.84        100
  rare      ordinal, --estimates=0.8               1    700  0.869 ± 0.031  0.87        102
  rare      ordinal, --estimates=0.8               2    700  0.883 ± 0.030  0.89         57
  rare      ordinal, --estimates=0.7               2    700  0.839 ± 0.034  0.85         75
  rare      ordinal, --estimates=0.8 --slips=0.5   2    700  0.794 ± 0.038  0.80         53
  rare      ordinal, --estimates=0.8, 2 threads    2    700  0.892 ± 0.029  0.91         38
  rare      ordinal, --estimates=0.8, batch 16     0   1400  0.924 ± 0.024  0.93         51
  rare      ordinal, --estimates=0.8, batch 16     1   1400  0.847 ± 0.034  0.85         50
  rare      ordinal, --estimates=0.8, batch 16     2   1400  0.917 ± 0.026  0.93         51
  rare      the same, 2 threads                    0   1400  0.882 ± 0.030  0.88         36
  rare      the same, 2 threads                    1   1400  0.887 ± 0.029  0.90         39
  rare      the same, 2 threads                    2   1400  0.929 ± 0.024  0.94         39

Over seeds 0, 1, 2 (the default's from round 3's table):

  build                            standard mean  min    rare mean  min    both min
  detect (default)                 0.849          0.828  0.771      0.670  0.670
  ordinal                          0.842          0.811  0.727      0.666  0.666
  restarts 2, trial 100, by loss   0.834          0.780  0.805      0.764  0.764
  --estimates=0.8                  0.806          0.761  0.798      0.768  0.761
  ordinal, --estimates=0.8         0.819          0.793  0.860      0.829  0.793
  the same, batch 16, 1400 steps   0.860          0.832  0.896      0.847  0.832
  the same, 2 threads              0.867          0.858  0.899      0.882  0.858

The best build is the ordinal read-out on a crowd of 80% estimates, trained as 1400 steps of 16
documents (and their 16 replaced copies) instead of 700 of 32: the same documents in the same time
(47 to 51 s on one thread). Standard 0.832, 0.878, 0.870 (mean 0.860), rare 0.924, 0.847, 0.917
(mean 0.896): both means pass 0.85, the minimum over the six runs does not (0.832, standard seed 0;
0.847, rare seed 1). Its worked-worked pairs stay weak (0.43 to 0.60 on 35 to 43 pairs, the
default's 0.70 to 0.86), and the standard setting's guess-guess pairs are 0.74 to 0.86. At 700
steps of 32 the same build has in the rare setting 0.829, 0.869, 0.883 (mean 0.860; guess-guess
0.84 to 0.89), but in the standard setting 0.819, 0.844, 0.793 (mean 0.819, below the default's
0.849): its worked-worked pairs fall to chance (0.42 to 0.51 on 35 to 43 pairs, the default's 0.70
to 0.86) and its guess-guess pairs stay at 0.65 to 0.74. 70% estimates trade between the two (seed
2: standard 0.809, rare 0.839; standard seed 0: 0.811). Half the worked answers slipped
(--slips=0.5, against 0.1) does not bring the worked-worked pairs back (0.47 on standard seed 2)
and is worse on rare seed 2 (0.794 against 0.883). Neither change alone does it: the ordinal
read-out on the default crowd (half estimates) orders rare guesses worse than the one detection
logit (guess-guess 0.79, 0.66, 0.72 against 0.84, 0.82, 0.67), and finer thresholds with more near
numbers are worse on rare seed 2 (0.638); 80% estimates with the one detection logit lift the rare
mean only to 0.798. Two restarts chosen by the detection loss on 256 held-back fresh problems after
100 steps have the best minimum over both settings (0.764), but the choice is near a coin toss: the
two restarts' held-back losses differ by 0.001 to 0.026 at step 100, and the choice took the second
restart on three of six runs, which gained 0.094 (rare seed 2, the same held-out pairs: the build
alone moves it from 0.670 to 0.764) and 0.007 (rare seed 1) and lost 0.048 (standard seed 2).
Choosing by how often the read-out ranks the nearer of two synthetic estimates first took the first
restart on seed 2 in both settings, the better one in the standard setting and the worse in the
rare; the loss after 200 steps of a 600-step schedule gave 0.780 and 0.716 there, below the
default. A crowd of 80% estimates (the rare setting's pairs are nearly all estimates) with the
detection logit lowers the standard mean (0.849 -> 0.806, its guess-worked pairs: 0.82 on seed 2
against 0.94); 65% is no better than 50% on rare seed 2. A peak learning rate of 5e-3 lowers the
training loss faster (one batch's at step 300: 0.42 and 0.34, against 0.45 to 0.54 at 3e-3) and is
better on standard seed 2 (0.846) but worse on rare seed 2 (0.638): a lower detection loss, much of
it on worked answers whose last line can be checked locally, is not closer ordering of estimates.
The restarts' build trains 800 steps (two of 100, then 600 more), about 8/7 of the default's time.
Time: the ordinal build on 80% estimates took 38 s on 2 threads with the machine otherwise idle
(rare seed 2, 0.892 there against 0.883 on one thread: the thread count changes the sums' order),
within the 45 s a toy build may add; its estimates are shorter than worked answers.
On 2 threads (one probe at a time) the batch-16 build took 36 to 40 s and reached 0.85 on every
run: standard 0.858, 0.873, 0.870, rare 0.882, 0.887, 0.929 (minimum 0.858, means 0.867 and 0.899). The thread count alone changes the
sums' order and moves a run by up to 0.042 (rare seed 0: 0.924 on one thread, 0.882 on two; rare
seed 1: 0.847 and 0.887), so the one-thread minimum (0.832) and the two-thread one (0.858) are two
draws of the same build's spread, which stays near the 0.85 line in the standard setting.

Measured on the toy built at 1699572 (the same probe, 2 threads, one probe at a time on the
otherwise idle 2-core machine; `--objective=ordinal --anchor=worked --estimates=0.8
--batch_size=16 --steps=1400 --threads=2 --seed=s`: a second crowd writer's worked answer as the
anchor, which is the problem's answer nine times in ten):

  setting   s  held-out acc.        guess-guess   guess-worked  worked-worked  build s
  standard  0  0.894 ± 0.031 (387)  0.85 (133)    0.96 (211)    0.70 (43)      35
  standard  1  0.878 ± 0.033 (377)  0.82 (128)    0.96 (214)    0.57 (35)      37
  standard  2  0.862 ± 0.035 (377)  0.82 (133)    0.95 (204)    0.55 (40)      45
  rare      0  0.929 ± 0.024 (450)  0.94 (389)    0.90 (58)     0.67 (3)       38
  rare      1  0.819 ± 0.036 (443)  0.81 (392)    0.90 (48)     0.33 (3)       43
  rare      2  0.904 ± 0.028 (436)  0.92 (382)    0.83 (52)     0.50 (2)       42

Means 0.878 (standard) and 0.884 (rare), against the answer-anchored build's 0.867 and 0.899 on
the same seeds: no measurable difference over three seeds, which is expected, since this anchor
is the answer with 10% of slips. It reads an answer key, so it is not the toy's build.

Measured the same way (2 threads; the machine shared with one other job, so the seconds vary),
`--objective=ordinal --anchor=self --estimates=0.8 --batch_size=16 --steps=1400 --threads=2
--seed=s`, the toy's build: the anchors are the SFT policy's own greedy worked answers
(toy.self_anchors; seed 0: 95.7% / 22.3% right, 99.3% / 80.1% within 2 of the answer):

  setting   s  held-out acc.        guess-guess   guess-worked  worked-worked  build s
  standard  0  0.868 ± 0.034 (387)  0.81 (133)    0.96 (211)    0.58 (43)      135
  standard  1  0.851 ± 0.036 (377)  0.79 (128)    0.95 (214)    0.49 (35)      84
  standard  2  0.878 ± 0.033 (377)  0.87 (133)    0.96 (204)    0.50 (40)      75
  rare      0  0.867 ± 0.031 (450)  0.88 (389)    0.78 (58)     1.00 (3)       60
  rare      1  0.801 ± 0.037 (443)  0.81 (392)    0.75 (48)     0.00 (3)       69
  rare      2  0.860 ± 0.033 (436)  0.87 (382)    0.81 (52)     0.50 (2)       70

Means 0.866 (standard) and 0.843 (rare); five runs of six reach 0.85, rare seed 1 does not
(0.801; the answer-keyed builds also fell lowest there: 0.819 worked). In `rare` the anchors are
mostly wrong, yet near the answer, and the read-out learns closeness from them: its guess-guess
pairs rank at 0.81 to 0.88, against 0.50 on the SFT features. Against the answer-anchored build
on the same seeds it runs from 0.086 lower (rare seed 1) to 0.010 higher (standard seed 0): means
0.866 / 0.843 against 0.867 / 0.899, so reading the answers is worth about 0.06 in `rare`, where
the SFT's own arithmetic is poor, and nothing in `standard`. The toy's own build (seed 0) is
measured by experiments/diagnose.py (RESULTS.md, "The toy's reward-model backbone"). The anchors
add a greedy pass over the 20,000 problems to the build (the seconds above: 60 to 135 s, against
35 to 45 s for the worked-anchored build on a less busy machine).
"""
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import model as M
import run
import toy
from experiments.diagnose import fit_head, gold_pairs
from reward import RewardModel
from run import knob
from toy import (answer_off_by, crowd_answer, grow, pad_left, replace_number, self_anchors,
                 top_token_features)
from train_selm import load_preferences


# ---------------------------------------------------------------- the probe
@torch.no_grad()
def rm_features(backbone, triples, pad_id, batch_size=128):
    """(Φ better (n, d), Φ worse (n, d)) as PbPO's sequence-level reward model computes them."""
    rm = RewardModel(backbone, "seq", normalize=True)
    prompts, better, worse = map(list, zip(*triples))
    out = []
    for responses in (better, worse):
        rows = []
        for i in range(0, len(prompts), batch_size):
            ids, attn, resp = data.collate(prompts[i:i + batch_size],
                                           responses[i:i + batch_size], pad_id)
            rows.append(rm.phi(ids, attn, resp))
        out.append(torch.cat(rows))
    return out


def kind(tok, response):
    return "guess" if data.decode(tok, response).startswith("I think") else "worked"


def probe(backbone, tok, train, heldout):
    """A BT head on the train pairs' features -> held-out accuracy, its 95% half-width, by kind."""
    w, _ = fit_head(*rm_features(backbone, train, tok.pad_token_id))
    better, worse = rm_features(backbone, heldout, tok.pad_token_id)
    right = ((better @ w) > (worse @ w)).tolist()
    accuracy = sum(right) / len(right)
    by_kind = {}
    for ok, (_, b, w_) in zip(right, heldout):
        by_kind.setdefault("-".join(sorted((kind(tok, b), kind(tok, w_)))), []).append(ok)
    return {"accuracy": accuracy, "ci95": 1.96 * math.sqrt(accuracy * (1 - accuracy) / len(right)),
            "n": len(right), "by_kind": {k: [len(v), sum(v) / len(v)] for k, v in by_kind.items()}}


# ---------------------------------------------------------------- the pretraining text
def fresh_problems(rng, excluded, n):
    """n problems (question, start, ops) whose question is none of `excluded`."""
    out = []
    while len(out) < n:
        question, start, ops = toy.toy_problem(rng)
        if question not in excluded:
            out.append((question, start, ops))
    return out


def encode_chat(tok, messages):
    """(ids, loss mask) of a chat as toy.CHAT_TEMPLATE renders it; the mask marks the assistant's
    tokens and its EOS."""
    ids, mask = [tok.bos_token_id], [0]
    for m in messages:
        text = tok(m["content"], add_special_tokens=False).input_ids
        ids += [tok.convert_tokens_to_ids(f"<|{m['role']}|>")] + text
        mask += [0] + [int(m["role"] == "assistant")] * len(text)
        if m["role"] == "assistant":
            ids.append(tok.eos_token_id)
            mask.append(1)
    return ids, mask


def pad_batch(docs, pad_id):  # [(ids, mask)] -> ids, attention mask, loss mask, each (B, S)
    S = max(len(ids) for ids, _ in docs)
    ids = torch.full((len(docs), S), pad_id)
    attn = torch.zeros(len(docs), S, dtype=torch.bool)
    loss_mask = torch.zeros(len(docs), S)
    for i, (x, m) in enumerate(docs):
        ids[i, :len(x)] = torch.tensor(x)
        attn[i, :len(x)] = True
        loss_mask[i, :len(x)] = torch.tensor(m, dtype=torch.float)
    return ids, attn, loss_mask


# ---------------------------------------------------------------- the backbone
def last_token_features(model, ids, attn):  # φ as RewardModel.phi takes it, with gradients
    hidden = model(ids, attn).float()  # (B, S, D)
    last = attn.shape[1] - 1 - attn.flip(-1).int().argmax(-1)  # (B,)
    return F.normalize(hidden[torch.arange(len(hidden)), last], dim=-1)  # (B, D)


def optimise(trainable, loss_of, steps, cfg, seed):
    """AdamW on `trainable` with the toy SFT's schedule (the floor cfg.lr_floor); loss_of(step,
    generator) -> the loss. A generator that yields after each step, so a caller can pause a run
    and go on with it later (the detector's restarts). cfg.ema > 0: the weights end as their
    exponential moving average (decay cfg.ema) instead of the last step's."""
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.wd)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    average = [p.detach().clone() for p in trainable]
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, then cosine down to the floor
            cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
            cosine = cfg.lr_floor + (1 - cfg.lr_floor) * cosine
            group["lr"] = cfg.lr * min((step + 1) / warmup, cosine)
        loss = loss_of(step, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
        opt.step()
        with torch.no_grad():
            for a, p in zip(average, trainable):
                a.lerp_(p, 1 - cfg.ema)
        if step % 100 == 0 or step == steps - 1:
            print(f"rm backbone step {step}/{steps}: loss {loss.item():.3f}", flush=True)
        yield step
    if cfg.ema:
        with torch.no_grad():
            for a, p in zip(average, trainable):
                p.copy_(a)


def train(model, trainable, loss_of, steps, cfg, seed):
    """optimise() to the end -> the model, frozen for evaluation."""
    for _ in optimise(trainable, loss_of, steps, cfg, seed):
        pass
    return model.eval().requires_grad_(False)


def within_thresholds(stated, anchors, thresholds):
    """The ordinal read-out's targets (N, K): 1 where |stated − anchor| ≤ d_k, else 0."""
    distance = (torch.tensor(stated) - torch.tensor(anchors)).abs()  # (N,)
    return (distance[:, None] <= torch.tensor(thresholds)[None]).float()  # (N, K)


@dataclass
class DetectionBatch:
    """Documents for the detector: the real answers, then as many with their number replaced."""
    rows: list  # token ids of each document, the real ones first
    stated: list  # the number each document states
    anchors: list  # the number its distance is measured from (by --anchor)
    moved: list  # how far each replaced number is from the real document's


def chat(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def build_detector(sft, tok, problems, cfg, anchors=None):
    """Replaced-number detection (module docstring) on the grown SFT policy. cfg.restarts > 1:
    that many initialisations train cfg.trial steps each; the one that scores best (cfg.choose)
    on fresh problems held back from training (those past the first cfg.problems; no label) goes
    on to the end. anchors: --anchor=self's, if the caller has them (else made here)."""
    rng = random.Random(cfg.seed + 1)
    docs = [(q, crowd_answer(start, ops, rng, cfg.scale, cfg.estimates, cfg.slips))
            for q, start, ops in problems]
    if cfg.anchor == "self":  # the SFT policy's own worked answer (greedy, made to start working)
        anchors = anchors or self_anchors(sft, tok, [q for q, _, _ in problems])
    elif cfg.anchor == "worked":  # another writer's worked answer to the problem: its '#### N'
        thread = random.Random(cfg.seed + 3)
        worked = [crowd_answer(start, ops, thread, estimates=0.0, slips=cfg.slips)
                  for _, start, ops in problems]
        anchors = [int(a.rsplit("#### ", 1)[1]) for a in worked]
    else:  # each fresh problem's answer (--anchor=document uses the document's own number)
        anchors = [start + sum(ops) for _, start, ops in problems]
    thresholds = [int(d) for d in cfg.thresholds.split(",")]
    shorten = lambda a: a.rsplit("\n", 1)[1] if cfg.short else a  # only the '#### N' line

    def detection_batch(real, donors):
        """The documents `real` and copies of them, each number replaced by the donor's (or, by
        cfg.hard and the ordinal's cfg.near, by one drawn near it)."""
        replaced, numbers, others, moved = [], [], [], []
        for i, j in zip(real, donors):
            q, a = docs[i]
            number = int(a.rsplit("#### ", 1)[1])
            other = int(docs[j][1].rsplit("#### ", 1)[1])
            if cfg.hard and rng.random() < cfg.hard:  # a hard one: near the number, as guesses are
                other = abs(number + rng.choice((-1, 1)) * rng.randint(1, 9))
            if cfg.objective == "ordinal" and rng.random() < cfg.near:  # graded: 1..near_max off
                centre = number if cfg.anchor == "document" else anchors[i]
                other = abs(centre + rng.choice((-1, 1)) * rng.randint(1, cfg.near_max))
            other = other if other != number else number + 1
            replaced.append((q, replace_number(a, other)))
            numbers.append(number)
            others.append(other)
            moved.append(abs(other - number))
        rows = [encode_chat(tok, chat(q, shorten(a)))[0] for q, a in [docs[i] for i in real]]
        rows += [encode_chat(tok, chat(q, shorten(a)))[0] for q, a in replaced]
        batch_anchors = numbers if cfg.anchor == "document" else [anchors[i] for i in real]
        return DetectionBatch(rows, numbers + others, batch_anchors * 2, moved)

    def detection_loss(model, head, batch):
        B = len(batch.moved)
        if cfg.top_only:  # left-padded: every row's last token at the end
            ids, attn = pad_left(batch.rows, tok.pad_token_id)
            logits = head(top_token_features(model, ids, attn))  # (2B, K)
        else:
            ids, attn, _ = pad_batch([(x, [0] * len(x)) for x in batch.rows], tok.pad_token_id)
            logits = head(last_token_features(model, ids, attn))  # (2B, K)
        if cfg.objective == "ordinal":  # logit k: is the stated number within d_k of the anchor?
            targets = within_thresholds(batch.stated, batch.anchors, thresholds)  # (2B, K)
            return F.binary_cross_entropy_with_logits(logits, targets)
        logits = logits.squeeze(-1)  # (2B,): one read-out
        if cfg.objective == "pairwise":  # Bradley–Terry: each answer above its replaced copy
            return -F.logsigmoid(logits[:B] - logits[B:]).mean()
        if cfg.objective == "distance":  # how far the number was moved: 0 for the real ones
            distance = torch.tensor([0.0] * B + batch.moved).log1p()  # (2B,)
            return F.mse_loss(logits, distance)
        is_real = torch.cat([torch.ones(B), torch.zeros(B)])
        return F.binary_cross_entropy_with_logits(logits, is_real)

    def estimate_pairs(check_problems, pair_rng):
        """Per problem two estimates, the nearer one first, 1 to 9 off its answer (as the SFT's
        guesses are): [(ids nearer, ids farther)]. Label-free: the problems are synthetic."""
        pairs = []
        for q, start, ops in check_problems:
            near, far = sorted(pair_rng.sample(range(1, 10), 2))
            texts = [answer_off_by(start, ops, d * pair_rng.choice((-1, 1)), True, pair_rng)
                     for d in (near, far)]
            pairs.append(tuple(encode_chat(tok, chat(q, a))[0] for a in texts))
        return pairs

    def closeness_order(model, head, pairs):
        """The share of pairs whose nearer estimate the read-out scores higher (its logits
        summed: the detector's one, or the ordinal's count of thresholds met)."""
        ids, attn = pad_left([x for pair in pairs for x in pair], tok.pad_token_id)
        score = head(top_token_features(model, ids, attn)).sum(-1).view(-1, 2)  # (P, 2)
        return (score[:, 0] > score[:, 1]).float().mean().item()

    def new_detector():
        """The grown model (its new blocks drawn from torch's global RNG) and its read-out, and
        their trainable parameters; cfg.warm: after that many steps of language modelling."""
        model = grow(sft, cfg.extra, cfg.identity)
        model.model.embed_tokens.requires_grad_(False)
        model.model.layers[:sft.config.num_hidden_layers].requires_grad_(False)
        outputs = len(thresholds) if cfg.objective == "ordinal" else 1
        head = torch.nn.Linear(model.config.hidden_size, outputs)  # the read-out, not kept
        grown = [p for p in model.parameters() if p.requires_grad]
        if cfg.warm:  # first language modelling on clean worked answers: the blocks learn sums
            worked = [encode_chat(tok, chat(q, toy.worked_answer(start, ops)))
                      for q, start, ops in problems[:cfg.problems]]

            def lm_loss(step, g):
                rows = torch.randint(len(worked), (cfg.batch_size,), generator=g).tolist()
                ids, attn, loss_mask = pad_batch([worked[i] for i in rows], tok.pad_token_id)
                logp = M.token_logprobs(model, ids, attn)  # (B, S)
                return -(logp * loss_mask).sum() / loss_mask.sum()

            train(model, grown, lm_loss, cfg.warm, cfg, cfg.seed + 2)
            model.train()
            for p in grown:
                p.requires_grad_(True)
        return model, head, grown + list(head.parameters())

    def start_run(model, head, trainable, seed):  # a paused optimise() on the training docs
        def loss_of(step, g):
            rows = torch.randint(cfg.problems, (2 * cfg.batch_size,), generator=g).tolist()
            batch = detection_batch(rows[:cfg.batch_size], rows[cfg.batch_size:])
            return detection_loss(model, head, batch)

        return optimise(trainable, loss_of, cfg.steps, cfg, seed)

    candidates = []
    for r in range(cfg.restarts):
        model, head, trainable = new_detector()
        candidates.append((model, head, start_run(model, head, trainable, cfg.seed + 1000 * r)))
    if cfg.restarts > 1:  # each a few steps; the best on the held-back problems goes on
        held_back = list(range(cfg.problems, len(problems)))
        check = detection_batch(held_back, held_back[1:] + held_back[:1])
        pairs = estimate_pairs(problems[cfg.problems:], random.Random(cfg.seed + 5))
        scores = []
        for model, head, steps in candidates:
            for _ in range(cfg.trial):
                next(steps)
            with torch.no_grad():
                if cfg.choose == "loss":  # the lower the better
                    scores.append(-detection_loss(model, head, check).item())
                else:
                    scores.append(closeness_order(model, head, pairs))
        print(f"rm backbone restarts' held-back {cfg.choose} scores: {scores}", flush=True)
        candidates = [candidates[scores.index(max(scores))]]
    model, _, steps = candidates[0]
    for _ in steps:
        pass
    return model.eval().requires_grad_(False)


def build_worksheet_lm(sft, tok, problems, cfg):
    """Language modelling on worksheets (module docstring) on the grown SFT policy."""
    rng = random.Random(cfg.seed + 1)
    docs = []
    for first in range(0, len(problems) - cfg.turns + 1, cfg.turns):
        error = rng.choice((0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9))  # the writer's own amount
        guesses = rng.choice((0.0, 0.3, 0.7, 1.0))
        messages = []
        for q, start, ops in problems[first:first + cfg.turns]:
            a = answer_off_by(start, ops, error * rng.choice((-1, 1)), rng.random() < guesses, rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        docs.append(encode_chat(tok, messages))
    model = grow(sft, cfg.extra)
    trainable = list(model.parameters())

    def loss_of(step, g):
        rows = torch.randint(len(docs), (cfg.batch_size,), generator=g).tolist()
        ids, attn, loss_mask = pad_batch([docs[i] for i in rows], tok.pad_token_id)
        logp = M.token_logprobs(model, ids, attn)  # (B, S)
        return -(logp * loss_mask).sum() / loss_mask.sum()

    return train(model, trainable, loss_of, cfg.steps, cfg, cfg.seed)


@dataclass
class Config:
    toy_dir: str = knob("out/toy", "the toy task (built if missing)")
    rare: bool = knob(False, "the toy's rare setting (as toy.py --rare)")
    objective: str = knob("detect", "detect (replaced-number detection), ordinal (is the number "
                          "within d_k of the --anchor, per d_k), pairwise (each answer above its "
                          "replaced copy), distance (regress how far it moved), lm")
    steps: int = knob(0, "training steps of the larger backbone; 0: probe the SFT features only")
    batch_size: int = knob(32, "documents a step (detect: as many again with a replaced number)")
    lr: float = knob(3e-3, "peak learning rate")
    lr_floor: float = knob(0.1, "the cosine schedule's last learning rate, as a share of the peak")
    clip: float = knob(1.0, "the gradients' global norm is clipped to this; 0: no clipping")
    wd: float = knob(0.1, "AdamW's weight decay (the grown blocks and the read-out)")
    ema: float = knob(0.0, "keep an exponential moving average of the weights, this decay; 0: off")
    extra: int = knob(2, "blocks grown on top of the SFT policy")
    problems: int = knob(20000, "fresh problems of the pretraining text")
    hard: float = knob(0.0, "the share of replaced numbers drawn 1 to 9 off the number")
    restarts: int = knob(1, "detect: initialisations tried, the best by a held-back loss",
                         at_least=1)
    trial: int = knob(100, "detect: steps each restart trains before the choice")
    check: int = knob(256, "detect: fresh problems held back for the restarts' choice")
    choose: str = knob("loss", "detect: the restarts' choice by the detection loss on the "
                       "held-back problems, or by how often the read-out puts the nearer of two "
                       "estimates first (order)", choices=("loss", "order"))
    thresholds: str = knob("0,1,2,4,8", "ordinal: the distances d_k, one logit each")
    near: float = knob(0.5, "ordinal: the share of replaced numbers drawn 1 to --near_max off the "
                       "anchor (the rest: another document's number)")
    near_max: int = knob(12, "ordinal: the farthest such replaced number", at_least=1)
    anchor: str = knob("self", "ordinal: the distance d_k is from the problem's answer (a "
                       "label of each document's correctness; the earlier rounds' default), from "
                       "the number the document stated before it was replaced (no answer read), "
                       "from the number another crowd writer's worked answer to the problem ends "
                       "with (a noisy answer key), or from the number the SFT policy's own greedy "
                       "worked answer ends with (self: no label; the toy's build)",
                       choices=("answer", "document", "worked", "self"))
    short: bool = knob(False, "train on the answer's '#### N' line only (not the worked steps)")
    top_only: bool = knob(True, "run the top block for the last token only (the same φ, faster)")
    warm: int = knob(0, "detect: steps of language modelling on worked answers first")
    identity: bool = knob(True, "detect: the grown blocks start as the identity (else HF's init)")
    threads: int = knob(1, "torch threads")
    scale: float = knob(3.0, "the crowd's estimates: |error| ~ Laplace(scale)")
    estimates: float = knob(0.5, "the share of the crowd's answers that are estimates")
    slips: float = knob(0.1, "the share of the crowd's worked answers with a slip")
    turns: int = knob(3, "problems a worksheet (lm)")
    seed: int = knob(0, "")
    save: str = knob("", "write the built backbone (and the tokenizer) here")
    out: str = knob("", "append the results as a JSON line to this file")


if __name__ == "__main__":
    cfg = run.parse_flags(Config, __doc__)
    with run.friendly_errors("experiments/rm_backbone.py"):
        torch.set_num_threads(cfg.threads)
        paths = toy.build(cfg.toy_dir, rare=cfg.rare)
        tok, sft = data.load_tokenizer(paths.model), M.from_pretrained(paths.model).eval()
        train_pairs = [(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"])
                       for p in load_preferences(paths.prefs, tok, 256)]
        heldout = gold_pairs(sft, tok, data.load_prompts(paths.valid, tok, 256), cfg.seed)
        rows = [dict(backbone="sft", **probe(sft, tok, train_pairs, heldout))]
        if cfg.steps:
            splits = (paths.train, paths.valid, paths.heldout)
            excluded = {p["prompt"] for f in splits for p in data.load_prompts(f, tok, 256)}
            t0 = time.time()
            rng = random.Random(cfg.seed + 7_000_003)
            problems = fresh_problems(rng, excluded, cfg.problems)
            if cfg.restarts > 1:  # held back for choosing among restarts, none a training one
                seen = excluded | {q for q, _, _ in problems}
                problems += fresh_problems(rng, seen, cfg.check)
            self_anchored = cfg.objective == "ordinal" and cfg.anchor == "self"
            anchors = self_anchors(sft, tok, [q for q, _, _ in problems]) if self_anchored else None
            torch.manual_seed(cfg.seed)  # the new blocks' and the read-out's initialisation
            if cfg.objective == "lm":
                backbone = build_worksheet_lm(sft, tok, problems, cfg)
            else:
                backbone = build_detector(sft, tok, problems, cfg, anchors)
            seconds = time.time() - t0
            rows.append(dict(backbone=f"{cfg.objective}, {cfg.steps} steps", seconds=seconds,
                             **probe(backbone, tok, train_pairs, heldout)))
            if self_anchored:  # the anchors against the answers: measured, never trained on
                totals = [start + sum(ops) for _, start, ops in problems]
                errors = [abs(a - t) for a, t in zip(anchors, totals)]
                rows[-1]["anchors"] = {"right": sum(e == 0 for e in errors) / len(errors),
                                       "within_2": sum(e <= 2 for e in errors) / len(errors)}
                print(f"the SFT policy's anchors: {rows[-1]['anchors']}")
            if cfg.save:
                M.save_pretrained(backbone, cfg.save)
                tok.save_pretrained(cfg.save)
        for r in rows:
            kinds = ", ".join(f"{k} {v[1]:.2f} (n={v[0]})" for k, v in sorted(r["by_kind"].items()))
            took = f", built in {r['seconds']:.0f} s" if "seconds" in r else ""
            print(f"{cfg.toy_dir}  {r['backbone']:<22} held-out accuracy {r['accuracy']:.3f} ± "
                  f"{r['ci95']:.3f} (n={r['n']}){took}; {kinds}")
        if cfg.out:
            with open(cfg.out, "a") as f:
                f.write(json.dumps({"config": asdict(cfg), "rows": rows}) + "\n")
