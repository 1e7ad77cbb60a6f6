"""The self-training data engine: the policy asks and answers its own questions (:mod:`.generate`), an expert
grades the answers (:mod:`.experts`, run by :mod:`.judge` into a resumable SQLite :mod:`.store`), and the best
and worst answer of each question become a DPO preference pair (:mod:`.pairs`)."""
