"""Training loops: ``loop`` (the step loop every method composes) and ``end_to_end`` (the end-to-end loop of
E2E-QP and DL-QAT)."""
