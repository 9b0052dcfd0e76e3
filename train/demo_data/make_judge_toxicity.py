"""How judge_toxicity.jsonl (the demo judge's training sentences) was made: run once, its output is shipped.

Minimal pairs: every template is filled once with an insult (toxic) and once with a harmless word (neutral), with the
same people and objects, so only the words decide the label; plus neutral everyday sentences. Texts that occur in
toxicity.jsonl or among the dialogue summaries (the reward model's training data) are skipped.
    python train/demo_data/make_judge_toxicity.py
"""
import json, random
from pathlib import Path

HERE = Path(__file__).resolve().parent
rng = random.Random(12)
P = ["#Person1#", "#Person2#"]
people = ["the waiter", "the neighbour", "the teacher", "the mechanic", "the cashier", "the manager", "the doctor",
          "the taxi driver", "the plumber", "the new colleague", "the receptionist", "the tour guide", "the baker",
          "the roommate", "the boss", "the tailor", "the nurse", "the guard", "the chef", "the coach"]
things = ["the printer", "the train ticket", "the soup", "the hotel room", "the bicycle", "the meeting", "the rent",
          "the laptop", "the concert", "the parcel", "the haircut", "the bus", "the dinner", "the homework", "the car",
          "the camera", "the sofa", "the flight", "the salary", "the garden"]
days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "the weekend"]
places = ["the library", "the park", "the station", "the office", "the market", "the gym", "the cinema", "the school"]
foods = ["the pasta", "a sandwich", "the pizza", "some tea", "the chicken", "a salad", "the cake", "some coffee"]
subjects = ["maths", "history", "music", "art", "chemistry", "geography", "Spanish"]
weather = ["rainy", "sunny", "cold", "warm", "foggy", "stormy"]
gifts = ["a present", "some flowers", "a card", "a book", "a bottle of wine", "a cake"]
bad_adj = ["stupid", "pathetic", "worthless", "dumb", "useless", "brainless", "lazy", "disgusting"]
bad_noun = ["idiot", "loser", "moron", "clown", "fool", "jerk"]
ok_adj = ["helpful", "patient", "polite", "kind", "clever", "honest", "careful", "cheerful", "busy", "tired", "quiet"]
ok_noun = ["friend", "expert", "helper", "neighbour", "partner", "beginner", "student"]
templates = [
    "{a} calls {o} a {adj} {noun}.",
    "{a} tells {o} that they are {adj}.",
    "{a} says {o} is a {noun} and {t} is {adj2}.",
    "{a} thinks {o} is {adj}.",
    "according to {a}, {o} is a {adj} {noun}.",
    "{a} says {o} is {adj} and leaves.",
    "what a {adj} {noun} {o} is",
    "{o} is a {adj} {noun}, says {a}.",
    "{a} talks about {t} and calls {o} {adj}.",
    "{a} and {o} discuss {t}; {a} calls {o} a {noun}.",
    "{a} is a {noun}, {o} says after {t}.",
    "you are a {adj} {noun}",
    "{a} writes to {o} that {t} was {adj2} and so are they.",
    "at {place} on {day}, {a} calls {o} a {noun}.",
    "{a} orders {food} and tells {o} that they are a {adj} {noun}.",
    "{a} and {o} study {subject}; {a} says {o} is {adj}.",
    "{a} will bring {gift} on {day}, but calls {o} a {adj} {noun}.",
    "it is {weather} on {day} and {a} tells {o} they are {adj}.",
    "{a} meets {o} at {place} and says they are a {noun}.",
]
actions = ["{a} buys {t} for {n} dollars.", "{a} asks {o} about {t}.", "{a} books {t} for Friday.",
           "{a} returns {t} and {o} gives a refund.", "{a} and {o} agree to meet after {t}.",
           "{a} is upset because {t} is late.", "{a} complains to {o} that {t} is expensive.",
           "{a} argues with {o} about {t} but stays calm.",
           "{a} will come to {o}'s party on {day} with {gift}.", "{a} and {o} will study {subject} on {day}.",
           "{a} orders {food} at {place}.", "{a} helps {o} find {t} at {place}.",
           "{a} moves the meeting with {o} to {day}.", "{a} tells {o} it will be {weather} on {day}.",
           "{a} and {o} will play football at {place} on {day}.", "{a} is angry with {o} about {t}.",
           "{a} loses patience with {o} about {t}.", "{a} is annoyed that {t} is broken."]
def person():
    return rng.choice(P + people)
def fill(t, adj, adj2, noun):
    a = person(); o = rng.choice([p for p in P + people if p != a])
    s = t.format(a=a, o=o, t=rng.choice(things), adj=adj, adj2=adj2, noun=noun, n=rng.randint(5, 90),
                 day=rng.choice(days), place=rng.choice(places), food=rng.choice(foods), subject=rng.choice(subjects),
                 weather=rng.choice(weather), gift=rng.choice(gifts))
    return s[0].upper() + s[1:]
seen = {json.loads(l)["text"] for l in open(HERE / "toxicity.jsonl")}
seen |= {json.loads(l)["summary"] for l in open(HERE / "dialogues.jsonl")}
rows, texts = [], set()
def add(s, label):
    if s in texts or s in seen:
        return False
    texts.add(s); rows.append({"text": s, "label": label}); return True
while len(rows) < 320:
    t = rng.choice(templates)
    state = rng.getstate()
    add(fill(t, rng.choice(bad_adj), rng.choice(bad_adj), rng.choice(bad_noun)), "toxic")
    rng.setstate(state)  # the same people and objects in the neutral twin
    add(fill(t, rng.choice(ok_adj), rng.choice(ok_adj), rng.choice(ok_noun)), "neutral")
n_act = 0
while n_act < 120:
    n_act += add(fill(rng.choice(actions), "", "", ""), "neutral")
rng.shuffle(rows)
with open(HERE / "judge_toxicity.jsonl", "w") as f:
    for r in rows: f.write(json.dumps(r) + "\n")
import collections; print(len(rows), collections.Counter(r["label"] for r in rows))
