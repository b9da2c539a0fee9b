"""Layered data: the sample format (`layers`), the synthetic dataset (`synthetic`), tfds builders
(`tfds_builders`), the grain input pipeline (`pipeline`), prompt tokenizers (`tokenizer`), a global prompt
split into layer prompts (`prompt_split`) and a contact-sheet renderer (`visualize`). Import the submodules directly; tfds and grain load lazily that way."""
