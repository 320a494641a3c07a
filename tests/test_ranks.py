"""The seeding rule that makes N ranks run the run of one: a keyed draw split over ranks is the
one-rank draw, and so are the responses sampled to it; every purpose has its own stream.

    python -m pytest -q tests/test_ranks.py
"""
import pytest

import data
import model as M
import ranks


@pytest.mark.parametrize("world", [2, 4])
def test_a_draw_split_over_ranks_is_the_one_rank_draw(world):
    items = list(range(100))
    whole, offset = ranks.draw(items, 12, 0, 1, 7, "explore", 3)
    assert offset == 0 and len(whole) == 12
    blocks = [ranks.draw(items, 12, rank, world, 7, "explore", 3) for rank in range(world)]
    assert [x for block, _ in blocks for x in block] == whole
    assert [offset for _, offset in blocks] == [12 // world * rank for rank in range(world)]
    assert ranks.draw(items, 12, 0, 1, 7, "leader", 3)[0] != whole  # another purpose, another draw


def test_responses_sampled_on_two_ranks_are_the_one_rank_responses(toy):
    _, paths = toy
    tok = data.load_tokenizer(paths.model)
    policy = M.from_pretrained(paths.model)
    prompts = data.load_prompts(paths.train, tok, 256)
    keys = (0, "policy", 1, 0)

    def responses(rank, world):
        items, offset = ranks.draw(prompts, 4, rank, world, 0, "leader", 1, 0)
        samples = ranks.sample(policy, items, 3, 1.0, offset, keys, 12, [tok.eos_token_id],
                               tok.pad_token_id)
        assert len(samples.prompt_ids) == len(samples.responses) == len(samples.logp)
        return samples.responses

    one = responses(0, 1)
    assert len(one) == 12 and len({tuple(y) for y in one}) > 1  # sampled, not one answer
    assert responses(0, 2) + responses(1, 2) == one
