"""Evaluation of layered samples: prompt following for the synthetic vocabulary (`prompt_following`,
`shapes`), FID (`fid`, `inception`) and CLIP score (`clip_score`), reported by `report`."""
