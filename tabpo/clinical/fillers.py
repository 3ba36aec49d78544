"""Slot fillers and unannotated text shared by every split.

Only the annotated phrasings are split between SFT, preference and test data; names,
medications, appointment logistics, the filler sentences and the bare (unannotated)
openings and closings below are shared, so a split differs from another in how labels are
phrased, not in the world the messages describe. A bare opening or closing has no greeting
or closing phrase ("Dr. Patel,"; "- Maria"), which is what separates it from an annotated
salutation or sign-off.
"""

from __future__ import annotations

from tabpo.clinical.schema import PATIENT_TO_PROVIDER, PROVIDER_TO_PATIENT


def _options(text: str) -> tuple[str, ...]:
    """Options written as one "|"-separated string, to keep the table compact."""
    return tuple(text.split("|"))


SLOTS: dict[str, tuple[str, ...]] = {
    "doctor": _options(
        "Patel|Nguyen|Garcia|Kim|Johnson|Okafor|Rossi|Cohen|Silva|Murphy|Hassan|Chen|Williams|"
        "Novak|Brooks|Ramirez"
    ),
    "doctor2": _options("Lee|Schmidt|Adeyemi|Martin|Park|Lopez|Fischer|Ali"),
    "doctor_first": _options("Anita|Michael|Sofia|David|Grace|Omar|Rachel|Ken"),
    "nurse": _options("Jenny|Marcus|Tasha|Paul|Rosa|Amy|Kevin|Leila"),
    "patient": _options(
        "Maria|James|Linda|Robert|Aisha|Wei|Carlos|Emily|Dorothy|Samuel|Priya|Tom|Grace|Luis|"
        "Fatima|Karen|Daniel|Hannah"
    ),
    "patient_last": _options(
        "Lopez|Smith|Brown|Wilson|Khan|Zhang|Davis|Martinez|Clark|Thompson|Ahmed|Walker|Young|"
        "Rivera|Scott|Baker"
    ),
    "med": _options(
        "metformin|lisinopril|atorvastatin|levothyroxine|amlodipine|sertraline|gabapentin|"
        "omeprazole|albuterol|losartan|insulin|montelukast|hydrochlorothiazide|escitalopram|"
        "meloxicam|pantoprazole"
    ),
    "med2": _options("simvastatin|glipizide|metoprolol|fluoxetine|naproxen|furosemide"),
    "dose": _options("5 mg|10 mg|20 mg|25 mg|40 mg|50 mg|100 mg|500 mg"),
    "condition": _options(
        "diabetes|blood pressure|asthma|thyroid|back pain|migraines|arthritis|anxiety|COPD|"
        "cholesterol|heart failure|acid reflux"
    ),
    "symptom": _options(
        "headaches|dizziness|nausea|fatigue|cough|heartburn|joint pain|shortness of breath|"
        "rash|leg cramps|trouble sleeping|chest tightness"
    ),
    "test": _options(
        "MRI|CT scan|colonoscopy|mammogram|blood work|echocardiogram|sleep study|ultrasound|"
        "X-ray|stress test|A1c test|bone density scan"
    ),
    "specialist": _options(
        "cardiologist|endocrinologist|dermatologist|physical therapist|neurologist|orthopedist|"
        "dietitian|rheumatologist|sleep specialist"
    ),
    "day": _options("Monday|Tuesday|Wednesday|Thursday|Friday"),
    "when": _options("next week|on Tuesday|this Friday|in two weeks|early next month"),
    "time": _options("8:30|9:15|10:00|11:45|1:30|2:15|3:40|4:00"),
    "weeks": _options("two weeks|three weeks|a month|ten days|six weeks"),
    "bp": _options("150/95|142/90|138/88|160/100|128/84"),
    "a1c": _options("6.9|7.2|7.4|7.8|8.1"),
    "pharmacy": _options(
        "CVS on Main Street|Walgreens on 5th Avenue|Kroger pharmacy|Costco pharmacy|"
        "mail-order pharmacy|Rite Aid on Elm Street|hospital pharmacy"
    ),
    "clinic": _options("Eastside|Riverside|Northgate|downtown|Oak Park|Westfield"),
    "activity": _options("walking|swimming|yoga|biking|gardening|strength training"),
}

FILLERS: dict[str, tuple[str, ...]] = {
    PATIENT_TO_PROVIDER: (
        "I'm writing about my visit last {day}.",
        "This is about the {med} you prescribed.",
        "I saw the {test} results come through on the portal this morning.",
        "My daughter helped me set up this portal account.",
        "Sorry for the long message.",
        "I had the {test} done on {day}.",
        "I'm following up on our phone call.",
        "I'm writing from my phone, so please excuse any typos.",
        "I have a couple of questions.",
        "This is {patient} {patient_last}, date of birth on file.",
        "I was at the {clinic} office on {day}.",
        "My next visit is on {day} at {time}.",
    ),
    PROVIDER_TO_PATIENT: (
        "I reviewed your chart this morning.",
        "This is a follow-up to our phone call.",
        "I'm covering for Dr. {doctor2} this week.",
        "I looked at the photos you uploaded.",
        "I received your message from {day}.",
        "I'm writing in response to your question about the {med}.",
        "I had a chance to look over your readings.",
        "Your {test} was done on {day}.",
        "I saw your message come in this afternoon.",
        "This message is about your recent visit.",
        "I spoke with Dr. {doctor2} earlier today.",
        "Your next visit is on {day} at {time}.",
    ),
}

# Bare openings and closings; "" means the message has none.
OPENINGS: dict[str, tuple[str, ...]] = {
    PATIENT_TO_PROVIDER: ("", "", "Dr. {doctor},", "To Dr. {doctor}:", "Re: my {med}"),
    PROVIDER_TO_PATIENT: ("", "", "{patient},", "{patient} {patient_last},", "Re: your {test}"),
}
CLOSINGS: dict[str, tuple[str, ...]] = {
    PATIENT_TO_PROVIDER: ("", "", "- {patient}", "{patient} {patient_last}"),
    PROVIDER_TO_PATIENT: ("", "", "Dr. {doctor}", "{doctor_first} {doctor}, MD", "- {nurse}, RN"),
}
