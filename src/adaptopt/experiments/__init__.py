"""The experiments of the papers, as the `adaptopt` command: an MNIST comparison and synthetic problems.

Needs the `experiments` extra (tqdm, matplotlib), imported only where it is used.
"""
