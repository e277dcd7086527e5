"""Research views (issue 7): the five studies of ../shared/papers reproduced on any loaded model, plus one beyond them.

| module          | study / question                                                     | needs a forward pass |
|-----------------|----------------------------------------------------------------------|----------------------|
| `truths`        | PhotonicGPT "two truths": MP signal % vs energy utilisation per role | for the measured KL  |
| `tying`         | weight-tying amplification: cut one use of a tied matrix at a time   | yes                  |
| `thresholds`    | 2512.12911: Ave_w(φ) and ŝ as the TW confidence slides, BEMA vs GB  | for the measured KL  |
| `deciles`       | Staats et al.: remove one decile of singular values per matrix type  | yes                  |
| `overlap`       | Staats et al.: O_k of right singular vectors with activation PCs     | yes (activations)    |
| `redundancy`    | crystallization: replace a matrix by rank-1 / random / zeros         | for the measured KL  |
| `whitened`      | SVD-LLM/ASVD: activation-whitened SVD against plain SVD              | yes                  |

What the views share: `context.py` (`ResearchContext`: a checkpoint's runtime and a what-if session of its own),
`common.py` (errors, JSON helpers, `Outcome`, the calibration split) and `activations.py` (where a model reads a
matrix, and the second moments of the activations it multiplies).

Every view is a function `view(context, settings, ...) -> <View>Result` whose `to_dict()` is the JSON the CLI writes;
settings are arguments, never attributes of the context. Nothing here mutates the checkpoint's tensors or the
runnable's module (hooks are removed before a call returns); forward passes take the runtime's lock.
"""
