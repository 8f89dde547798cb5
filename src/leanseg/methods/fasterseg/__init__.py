"""FasterSeg search-side tools: derivation of networks from architecture parameters
(:mod:`~leanseg.methods.fasterseg.derive`) and lookup-table latency
(:mod:`~leanseg.methods.fasterseg.latency`). The networks themselves are
:mod:`leanseg.models.fasterseg`. Import the submodules directly.
"""
