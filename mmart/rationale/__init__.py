"""Rationales: a short justification of each SFT decision's target, written by a teacher.

The first building block of "prediction with reasoning" (the student later learns justification +
answer): ``mmart rationales`` takes the decisions SFT trains on (``mmart.train.sft.sft_examples``),
their SFT targets (``targets``), and writes one rationale per decision (``stage``), either by
verbalising the taste teacher's own evidence (``taste``) or by prompting a local causal LM
(``llm``). docs/architecture.md#rationales-mmart-rationales explains the stage.
"""
