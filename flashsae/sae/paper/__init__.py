"""``flashsae paper``: the experiments of "Dimensional Collapse in Transformer Attention Outputs" (arXiv
2508.16929), run on any model with flashsae, written up as a Markdown report with figures and raw JSON.

`plan` holds what to run (a full preset for a CPU hour, a quick one for the tests, options to scale up on a
GPU), `collapse` measures where the rank drops, `runs` trains and evaluates the SAEs of every sweep, `report`
writes the figures and the Markdown, `command` is the command line.
"""
