"""Drawing: panels, the static HTML gallery, and side-by-side comparison with CKA.

Everything here reads what the core computes (:class:`interp.topk.TopK`,
projections, fields) and turns it into pictures and pages.
"""
