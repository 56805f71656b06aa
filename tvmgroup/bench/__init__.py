"""``tvmgroup bench``: times PyTorch formulations of the grouped linear layer against tvmgroup.

- :mod:`tvmgroup.bench.shapes`: the shapes to time and their FLOP / byte counts.
- :mod:`tvmgroup.bench.inputs`: the input layouts (``--layout``): shapes, and the rows form results are checked in.
- :mod:`tvmgroup.bench.formulations`: the registry of formulations, each built from one weight.
- :mod:`tvmgroup.bench.timing`: warm-up, repeats over rotated inputs, medians.
- :mod:`tvmgroup.bench.machine`: machine info and the measured compute / memory ceilings.
- :mod:`tvmgroup.bench.runner`: checks each formulation, then times it, shape by shape.
- :mod:`tvmgroup.bench.report`: the text table, the JSON file and the PNG chart.
"""
