"""The strict checker `final_number` on a table of hand-written and real responses."""

import pytest

from apo_jax.eval.checkers import final_number

ADD = "What is 12 + 3?"
CMP = "Which number is larger, 74 or 95?"
CNT = "How many times does the letter 'a' appear in the word 'penha'?"
WORD = "Tom has 12 books and gets 3 more. How many books does he have now?"
BIG = "What is 1200 + 34?"

# (question, answer, response, verdict)
CASES = [
    # right, in several wordings
    (ADD, 15, "12 + 3 = 15", True),
    (ADD, 15, "The answer is 15.", True),
    (ADD, 15, "15", True),
    (ADD, 15, "15.", True),
    (ADD, 15, "12 plus 3 equals 15.", True),
    (ADD, 15, "To find the sum, we add 12 and 3.\n\n12 + 3 = 15\n\nSo the answer is 15.", True),
    (ADD, 15, "**15**", True),
    (ADD, 15, "The answer is **15**.", True),
    (ADD, 15, "The sum of 12 and 3 is 15.", True),
    (ADD, 15, "\\boxed{15}", True),
    (BIG, 1234, "1200 + 34 = 1,234.", True),
    (BIG, 1234, "The answer is 1,234", True),
    (CMP, 95, "Comparing 74 and 95, the larger number is 95.", True),
    (CMP, 95, "95 is larger than 74.", True),
    (CMP, 95, "The larger number is 95. I hope this helps!", True),
    (WORD, 15, "Tom has 12 books and gets 3 more, so he has a total of 12 + 3 = 15 books.", True),
    (WORD, 15, "Tom now has 15 books.", True),
    (CNT, 1, "The letter 'a' appears 1 time in the word 'penha'.", True),
    ("What is 7 times 8?", 56, "7 x 8 = 56", True),
    ("What is 3 - 10?", -7, "3 - 10 = -7", True),
    ("How many minutes are in 2.5 hours?", 150, "2.5 hours is 2.5 x 60 = 150 minutes.", True),
    # wrong value
    (ADD, 15, "12 + 3 = 16", False),
    (ADD, 15, "The answer is 16.", False),
    (BIG, 1234, "1200 + 34 = 1,244.", False),
    (WORD, 15, "Tom has 12 books and gets 3 more, so he has a total of 12 + 3 = 16 books.", False),
    # several candidate answers (the hedges)
    (ADD, 13, "Maybe 12, maybe 13, maybe 14", False),
    (ADD, 13, "The answer is 13. The answer is 14.", False),
    (ADD, 15, "It is either 15 or 16.", False),
    (ADD, 15, "The answer is 15 or 16.", False),
    (ADD, 15, "The result is about 14 to 16.", False),
    # a restated question, an echo, no answer
    (CMP, 95, "Comparing 74 and 95, 74 and 95.", False),
    (CMP, 95, "Which number is larger, 74 or 95?", False),
    (ADD, 15, "What is 12 + 3?", False),
    (ADD, 15, "To find the answer, we add the numbers 12 and 3.", False),
    (ADD, 15, "I cannot answer that.", False),
    (ADD, 15, "", False),
    (ADD, 15, "12 + 3 =", False),
    # an answer about another item (the letter count)
    (CNT, 1, "The letter 'e' appears 1 time in the word 'haha'.", False),
    (CNT, 1, "The letter 'a' appears 1 time in the word 'haha'.", False),
    # real SmolLM2-135M-Instruct outputs (greedy), see the REAL_* cases below
]

REAL = [
    # quoted in issue 28 from SmolLM2-135M-Instruct's greedy answers
    (
        "Ravi has 17 apples and gets 12 more. How many apples does Ravi have now?",
        29,
        "Ravi has 17 apples and gets 12 more, so Ravi now has 17 + 12 = 20 apples.",
        False,
    ),
    # sampled here with python -m apo_jax.eval's generation on /work/models/smollm2-hf (greedy)
    (
        "What is 59 + 63?",
        122,
        "To add 59 and 63, we need to combine the numbers in a way that "
        "results in a single number with the opposite of the original operation. In this case, we "
        "can simply add the numbers together: 59 + 63 = 142.",
        False,
    ),
    (
        "What is 50 + 75?",
        125,
        "To add 50 and 75, you simply add them together: 50 + 75 = 125.",
        True,
    ),
    (
        "What is 2 times 6?",
        12,
        "To find 2 times 6, we can use the formula for multiplication of "
        "integers: 2 × 6 = 12. So, 2 times 6 is 12.",
        True,
    ),
    (
        "What is 78 - 42?",
        36,
        "To calculate 78 - 42, you simply subtract 42 from 78, which gives you 78.",
        False,
    ),
    (
        "What is 84 - 37?",
        47,
        "To solve this problem, we need to first calculate 84 - 37, which is "
        "21. Then, we need to find the difference between 21 and 37, which is 14.\n\nSo, 84 - 37 = "
        "14.",
        False,
    ),
    (
        "What is 8 times 3?",
        24,
        "To find 8 times 3, we can use the formula for multiplication of "
        "integers with remainders. In this case, 8 is 8, and 3 is 3. So, 8 * 3 = 24.\n\nThis is a "
        "fundamental concept in mathematics, part",
        True,
    ),
    (
        "What is 7 times 8?",
        56,
        "In this case, 7 * 8 = 54, which is equivalent to 7 * 8 + 1.\n\n"
        "This is a classic example of how modular",
        False,
    ),
    (
        "Tom has 66 apples and buys 76 more. How many apples does he have now?",
        142,
        "Tom has 66 apples, and he buys 76 more apples. So, he has 66 + 76 = 122 apples now.",
        False,
    ),
    (
        "Tom has 21 apples and buys 20 more. How many apples does he have now?",
        41,
        "Tom has 21 apples - 20 apples = 10 apples left.\nTom has 21 apples - 10 apples = 11 apples."
        "\nTom has 11 apples now.\n#### 11\nThe answer is: 11",
        False,
    ),
    (
        "Tom has 61 apples and buys 48 more. How many apples does he have now?",
        109,
        "Tom has 61 - 48 = 12 apples left.\nHe buys 12 apples, so he has 12 apples - 12 apples = 0 "
        "apples remaining.\nTom has 61 - 12 = 48 apples remaining.\n#### 48\nThe answer is: 48",
        False,
    ),
    (
        "Compute 4 x 4.",
        16,
        "To find 4 x 4, we can use the formula for multiplication of 4x4, "
        "which is 4 * 4 = 16. This is the result of the multiplication of 4x4.",
        True,
    ),
    (
        "What is 5 times 5?",
        25,
        "To find 5 times 5, we can use the formula for multiplication of "
        "a number by itself, which is 5 * 5 = 25. However, in this context, 5 * 5 is equivalent to "
        "25, which is the result of 5 multiplied by itself.\n\n",
        True,
    ),
    (
        "Which number is larger, 825 or 251?",
        825,
        "To solve this problem, we need to find the "
        "greatest common factor of 825 and 251.\n\nThe greatest common factor is 825, which is the "
        "product of all prime numbers up to 825.\n\nThe least common multiple of 825 and ",
        False,
    ),
    (
        "Which number is larger, 103 or 975?",
        975,
        "To solve this problem, we need to find the "
        "greatest common divisor (GCD) of 103 and 975.\n\nThe GCD of 103 and 975 is 103.",
        False,
    ),
    (
        "What is 10 + 88?",
        98,
        "10 + 88 = 100 + 88 = 100 * 2 = 200\n\nThis is a classic example of "
        "a mathematical identity that is often misunderstood.",
        False,
    ),
    (
        "Tom has 18 apples and buys 34 more. How many apples does he have now?",
        52,
        "Tom has 18 apples - 34 = 12 apples left.\nTom has 12 apples.\nTom has 12 apples.\nTom has "
        "12 apples.\nTom has 12",
        False,
    ),
]


@pytest.mark.parametrize("question,answer,response,verdict", CASES + REAL)
def test_final_number_table(question, answer, response, verdict):
    assert final_number({"prompt": question, "answer": answer}, response) is verdict


def test_table_is_large_enough():
    assert len(CASES + REAL) >= 40
    assert sum(v for *_, v in CASES + REAL) >= 15 and sum(not v for *_, v in CASES + REAL) >= 15


def test_final_number_reads_chats_and_string_answers():
    chat = {"messages": [{"role": "user", "content": ADD}], "answer": "15"}
    assert final_number(chat, "12 + 3 = 15.")
    with pytest.raises(ValueError, match="not a number"):
        final_number({"prompt": ADD, "answer": "fifteen"}, "15")
    with pytest.raises(ValueError, match="not a number"):
        final_number({"prompt": ADD}, "15")
