"""The engine every recipe runs on: typed configs (:mod:`.config`), builders from a config to
data, models and optimizers (:mod:`.builders`), recipe loading (:mod:`.recipes`), the
runner that trains every stage and writes ``run.json`` (:mod:`.runner`), export and
drawing (:mod:`.predict`)."""
