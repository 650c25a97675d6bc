"""The knowledge base of the example: help articles for Skylark, a fictitious photo-backup service.

Written for this example (no real product). Each article: an id (its path under kb/), a title, its
sections (heading -> text), and questions customers ask that it answers, in several wordings; the
conversations in `make_data.py` are built from these questions.
"""

from __future__ import annotations

ARTICLES: list[dict] = [
    # ------------------------------------------------------------------ billing
    {"id": "billing/plans.md", "title": "Plans and prices",
     "sections": {"Plans": "Skylark has three plans. Free keeps 5 GB of photos. Plus costs 3 euros a month for "
                           "200 GB. Family costs 8 euros a month for 2 TB shared by up to six people.",
                  "Yearly billing": "Paying yearly saves two months: Plus is 30 euros a year and Family 80 euros."},
     "questions": ["how much does the plus plan cost", "what plans do you offer and what do they cost",
                   "is there a cheaper price if I pay for a year"]},
    {"id": "billing/refunds.md", "title": "Refunds",
     "sections": {"Refund window": "You can ask for a full refund within 14 days of a payment. After 14 days "
                                   "we refund the unused months of a yearly plan only.",
                  "How to ask": "Open Settings, Billing, Payment history, choose the payment and press Request "
                                "refund. The money returns to the original card within 5 to 10 business days."},
     "questions": ["can I get my money back", "how do I request a refund for last month's payment",
                   "how long does a refund take to reach my card"]},
    {"id": "billing/payment-methods.md", "title": "Payment methods",
     "sections": {"Accepted methods": "We accept Visa, Mastercard, American Express, PayPal and SEPA direct "
                                      "debit. Gift cards can be redeemed too.",
                  "Changing your card": "Go to Settings, Billing, Payment method and press Replace card. The "
                                        "new card is charged from the next renewal."},
     "questions": ["do you take paypal", "how do I change the credit card I pay with",
                   "which payment methods are accepted"]},
    {"id": "billing/invoices.md", "title": "Invoices and receipts",
     "sections": {"Download": "Every payment has an invoice as a PDF under Settings, Billing, Payment history. "
                              "Press the download icon next to the payment.",
                  "Company details": "To add a VAT number or company address to future invoices, fill in "
                                     "Billing details before the next payment; past invoices cannot be changed."},
     "questions": ["where can I download my invoice", "I need a receipt for my payment",
                   "how do I put my VAT number on the invoice"]},
    {"id": "billing/failed-payment.md", "title": "When a payment fails",
     "sections": {"What happens": "If a renewal payment fails we retry three times over seven days and email "
                                  "you each time. Your photos stay safe during that time.",
                  "After the grace period": "If all retries fail the account moves to the Free plan. Uploads "
                                            "pause when you are over 5 GB, but nothing is deleted for 90 days."},
     "questions": ["my payment failed what happens now", "my card was declined for the renewal",
                   "will my photos be deleted if my payment does not go through"]},
    {"id": "billing/cancel.md", "title": "Cancelling a subscription",
     "sections": {"How to cancel": "Open Settings, Billing and press Cancel subscription. The plan stays "
                                   "active until the end of the period you paid for.",
                  "Your photos after cancelling": "After the paid period the account becomes Free. Photos "
                                                  "beyond 5 GB stay readable and downloadable for 90 days."},
     "questions": ["how do I cancel my subscription", "I want to stop paying for plus",
                   "what happens to my photos if I cancel"]},
    {"id": "billing/upgrade.md", "title": "Upgrading or downgrading",
     "sections": {"Upgrade": "Upgrades take effect at once; you pay the difference for the rest of the period.",
                  "Downgrade": "A downgrade starts at the next renewal. If your photos exceed the smaller "
                               "plan, uploads pause until you free space."},
     "questions": ["how do I upgrade to the family plan", "can I switch to a smaller plan",
                   "do I pay the full price when I upgrade in the middle of the month"]},
    {"id": "billing/student-discount.md", "title": "Student discount",
     "sections": {"Who qualifies": "Students at a university or college get Plus at half price for up to "
                                   "four years.",
                  "How to apply": "Verify your student email under Settings, Billing, Discounts. The discount "
                                  "applies from the next payment and must be renewed every year."},
     "questions": ["do you have a student discount", "how do I get the student price",
                   "is there a discount for university students"]},
    {"id": "billing/gift-cards.md", "title": "Gift cards",
     "sections": {"Buying": "Gift cards for 3, 6 or 12 months of Plus are sold on our website.",
                  "Redeeming": "Enter the 16-character code under Settings, Billing, Redeem code. The months "
                               "are added to your current plan; gift cards cannot be exchanged for cash."},
     "questions": ["how do I redeem a gift card", "where do I enter my gift code",
                   "can I give skylark as a present"]},
    {"id": "billing/taxes.md", "title": "Taxes and currencies",
     "sections": {"Currency": "Prices are shown in euros, US dollars or pounds depending on your country.",
                  "VAT": "Prices include VAT where the law requires it. Business customers with a valid VAT "
                         "number in the EU are charged without VAT."},
     "questions": ["are prices shown with vat included", "can I pay in dollars",
                   "why was I charged tax on my subscription"]},
    # ------------------------------------------------------------------ account
    {"id": "account/password-reset.md", "title": "Resetting your password",
     "sections": {"Forgot your password": "On the sign-in page press Forgot password and enter your email. "
                                          "A reset link arrives within a few minutes and works for one hour.",
                  "No email arrived": "Check the spam folder and that you typed the address you signed up "
                                      "with. You can ask for a new link after five minutes."},
     "questions": ["I forgot my password", "how do I reset my password",
                   "the password reset email never arrived"]},
    {"id": "account/two-factor.md", "title": "Two-factor authentication",
     "sections": {"Turn it on": "Under Settings, Security, press Enable two-factor and scan the code with an "
                                "authenticator app. Save the ten backup codes somewhere safe.",
                  "Lost your phone": "Sign in with one of your backup codes, then set up two-factor again "
                                     "on the new phone."},
     "questions": ["how do I turn on two factor authentication", "I lost my phone with the authenticator app",
                   "how do I set up 2fa"]},
    {"id": "account/change-email.md", "title": "Changing your email address",
     "sections": {"Change it": "Go to Settings, Account, Email and enter the new address. We send a "
                               "confirmation link to the new address; the change applies once you open it."},
     "questions": ["how do I change my email address", "I want to use a different email for my account",
                   "can I update the email I sign in with"]},
    {"id": "account/delete-account.md", "title": "Deleting your account",
     "sections": {"Before you delete": "Download the photos you want to keep: deletion is permanent.",
                  "How to delete": "Go to Settings, Account and press Delete account. We erase your photos "
                                   "and personal data within 30 days; a paid plan is cancelled first."},
     "questions": ["how do I delete my account", "I want to close my skylark account permanently",
                   "how long until my data is erased after deleting the account"]},
    {"id": "account/sign-in-problems.md", "title": "Cannot sign in",
     "sections": {"Check first": "Make sure caps lock is off and that you use the email you signed up with. "
                                 "Accounts created with Google or Apple sign in with that button, not a password.",
                  "Locked account": "After ten wrong passwords the account locks for 30 minutes to protect it."},
     "questions": ["I can't log in to my account", "my account is locked after too many attempts",
                   "it says my password is wrong but it is right"]},
    {"id": "account/devices.md", "title": "Managing signed-in devices",
     "sections": {"See your devices": "Settings, Security, Devices lists every phone and computer signed in.",
                  "Sign a device out": "Press Sign out next to a device to remove it, for example a lost phone. "
                                       "It must sign in again to upload."},
     "questions": ["how do I sign out a lost phone", "which devices are logged into my account",
                   "remove an old computer from my account"]},
    {"id": "account/username.md", "title": "Your display name",
     "sections": {"Change your name": "Your display name appears on shared albums. Change it under Settings, "
                                      "Account, Display name; it can be changed once a week."},
     "questions": ["how do I change my display name", "the name on shared albums is wrong",
                   "can I rename my profile"]},
    {"id": "account/family-members.md", "title": "Family plan members",
     "sections": {"Invite": "The Family plan owner invites members under Settings, Family, Invite. Each "
                            "member has a private library; storage is shared.",
                  "Remove": "The owner can remove a member at any time. The member keeps their photos and "
                            "moves to the Free plan."},
     "questions": ["how do I add my wife to the family plan", "how do I invite someone to my family plan",
                   "what happens when I remove someone from my family plan"]},
    # ------------------------------------------------------------------ how-tos
    {"id": "howto/auto-backup.md", "title": "Turning on automatic backup",
     "sections": {"Phone": "In the Skylark app open Settings, Backup and switch on Auto backup. New photos "
                           "and videos upload as soon as the phone is on Wi-Fi.",
                  "Mobile data": "To also upload on mobile data, switch on Use mobile data; videos still wait "
                                 "for Wi-Fi unless you allow them too."},
     "questions": ["how do I turn on automatic backup", "how can my phone upload photos automatically",
                   "can it back up over mobile data"]},
    {"id": "howto/shared-albums.md", "title": "Sharing an album",
     "sections": {"Create a link": "Open an album, press Share and choose Create link. Anyone with the link "
                                   "can view; switch on Allow uploads to let them add photos.",
                  "Stop sharing": "Press Share, then Delete link. The old link stops working at once."},
     "questions": ["how do I share an album with my family", "how can friends add photos to my album",
                   "how do I stop sharing an album"]},
    {"id": "howto/download-all.md", "title": "Downloading all your photos",
     "sections": {"Export": "On the website open Settings, Export and press Create export. We prepare zip "
                            "files of up to 10 GB each and email you when they are ready, usually within a day.",
                  "Originals": "Exports always contain the original files with their metadata."},
     "questions": ["how can I download all my photos at once", "I want an export of my whole library",
                   "do exports keep the original quality"]},
    {"id": "howto/search.md", "title": "Searching your photos",
     "sections": {"Search": "Type a place, a date, a thing like beach or dog, or a person's name in the "
                            "search bar. Search runs on our servers only for photos you uploaded.",
                  "People": "Name a face in People once and Skylark finds that person in other photos."},
     "questions": ["how do I search for photos of my dog", "can I find photos by place or date",
                   "how do I find all photos of one person"]},
    {"id": "howto/albums.md", "title": "Creating albums",
     "sections": {"New album": "Select photos, press Add to and choose New album. A photo can be in several "
                               "albums without using extra storage."},
     "questions": ["how do I create an album", "does putting a photo in two albums use more space",
                   "how do I organize photos into albums"]},
    {"id": "howto/trash.md", "title": "Trash and restoring photos",
     "sections": {"Restore": "Deleted photos stay in Trash for 60 days. Open Trash, select them and press "
                             "Restore.",
                  "Empty trash": "Emptying the trash deletes the photos for good and frees their storage."},
     "questions": ["I deleted a photo by mistake can I get it back", "how long do photos stay in the trash",
                   "how do I restore deleted pictures"]},
    {"id": "howto/desktop-app.md", "title": "The desktop app",
     "sections": {"Install": "Download Skylark for Windows or macOS from our website. Choose the folders to "
                             "back up; the app uploads new files in them automatically.",
                  "Linux": "There is no Linux app yet; use the website to upload."},
     "questions": ["is there an app for my computer", "how do I back up a folder on my mac",
                   "do you have a linux client"]},
    {"id": "howto/storage-saver.md", "title": "Freeing space on your phone",
     "sections": {"Free up space": "In the app press Free up space: photos already backed up are removed from "
                                   "the phone but stay in Skylark."},
     "questions": ["my phone is full how do I free space", "can I remove backed up photos from my phone",
                   "how does free up space work"]},
    {"id": "howto/video.md", "title": "Videos",
     "sections": {"Limits": "Videos up to 10 GB and 4K resolution are backed up in original quality. They "
                            "count toward your storage like photos."},
     "questions": ["can skylark back up my videos", "what is the maximum video size",
                   "are 4k videos supported"]},
    {"id": "howto/print.md", "title": "Ordering prints",
     "sections": {"Prints": "Select photos and press Order prints. Prints ship within the EU, the UK and the "
                            "US in 3 to 7 days; the price is shown before you pay."},
     "questions": ["can I order printed photos", "how long does shipping of prints take",
                   "do you print photo books or prints"]},
    {"id": "howto/import.md", "title": "Importing from another service",
     "sections": {"Import": "On the website open Settings, Import and connect Google Photos, iCloud or "
                            "Dropbox. The import runs in the background and can take several days for "
                            "large libraries."},
     "questions": ["how do I move my photos from google photos", "can I import my icloud library",
                   "how long does an import take"]},
    {"id": "howto/raw-files.md", "title": "RAW files",
     "sections": {"Supported": "RAW files from most cameras (CR3, NEF, ARW, DNG) are backed up as they are "
                               "and shown with a preview."},
     "questions": ["do you support raw photos", "will my nikon nef files upload", "can I back up dng files"]},
    # ------------------------------------------------------------------ troubleshooting
    {"id": "troubleshooting/backup-stuck.md", "title": "Backup is stuck",
     "sections": {"Check": "Backup waits for Wi-Fi, for the battery to be above 20 percent, and for the app "
                           "to be allowed to run in the background.",
                  "Still stuck": "Sign out of the app and sign in again; this restarts the upload queue "
                                 "without uploading anything twice."},
     "questions": ["my backup is stuck on waiting", "photos are not uploading from my phone",
                   "the upload has not moved for hours"]},
    {"id": "troubleshooting/duplicates.md", "title": "Duplicate photos",
     "sections": {"Why": "Duplicates appear when the same photo was uploaded from two devices with edits.",
                  "Fix": "Open Utilities, Find duplicates; Skylark groups identical photos and keeps one."},
     "questions": ["I see every photo twice", "how do I remove duplicate photos",
                   "why are there duplicates in my library"]},
    {"id": "troubleshooting/app-crash.md", "title": "The app crashes",
     "sections": {"Update": "Update Skylark and your phone's system first; most crashes are fixed in updates.",
                  "Report": "If it still crashes, open Settings, Help, Send diagnostics so we can see what "
                            "happened."},
     "questions": ["the app keeps crashing", "skylark closes as soon as I open it",
                   "the android app crashes when uploading"]},
    {"id": "troubleshooting/storage-full.md", "title": "Storage is full",
     "sections": {"What it means": "When your plan's storage is full, uploads pause; nothing is deleted.",
                  "What to do": "Empty the trash, delete large videos, or upgrade to a bigger plan."},
     "questions": ["it says my storage is full", "uploads paused because I am out of space",
                   "how do I get more storage"]},
    {"id": "troubleshooting/slow-upload.md", "title": "Uploads are slow",
     "sections": {"Speed": "Upload speed depends on your connection. Videos in 4K are large and take longer.",
                  "Tips": "Keep the app open and the phone charging overnight for the first backup."},
     "questions": ["uploading is very slow", "why does the first backup take so long",
                   "how can I make uploads faster"]},
    {"id": "troubleshooting/missing-photos.md", "title": "Photos are missing",
     "sections": {"Check first": "Look in Trash and in Archive; archived photos are hidden from the timeline.",
                  "Wrong account": "Check that the phone is signed in to the same Skylark account as the "
                                   "website."},
     "questions": ["some of my photos disappeared", "I can't find pictures I uploaded last week",
                   "photos are missing from my timeline"]},
    {"id": "troubleshooting/wrong-dates.md", "title": "Wrong dates on photos",
     "sections": {"Why": "Photos without date metadata, such as scans or screenshots, get their upload date.",
                  "Fix": "Select the photos and press Edit date and time to correct them."},
     "questions": ["my photos show the wrong date", "scanned photos are sorted on the wrong day",
                   "how do I change the date of a photo"]},
    {"id": "troubleshooting/share-link-broken.md", "title": "A shared link does not open",
     "sections": {"Why": "A link stops working when its owner deletes it or the album, or when the link "
                         "had an expiry date that passed.",
                  "Fix": "Ask the owner to create a new link."},
     "questions": ["the shared album link does not work", "my friend's link says album not found",
                   "why did a shared link stop working"]},
    # ------------------------------------------------------------------ policies
    {"id": "policies/privacy.md", "title": "Privacy",
     "sections": {"Your photos": "Your photos are private unless you share them. Skylark staff cannot open "
                                 "your library without your permission.",
                  "Face recognition": "Face grouping is off in the EU until you switch it on, and you can "
                                      "switch it off and delete the face data at any time."},
     "questions": ["can skylark employees see my photos", "is face recognition turned on",
                   "how do I delete my face data"]},
    {"id": "policies/data-retention.md", "title": "How long we keep data",
     "sections": {"Active accounts": "We keep your photos as long as your account exists.",
                  "Inactive accounts": "Free accounts with no sign-in for two years are warned by email and "
                                       "deleted three months after the warning."},
     "questions": ["will you delete my account if I don't use it", "how long do you keep my photos",
                   "what happens to inactive free accounts"]},
    {"id": "policies/security.md", "title": "Security",
     "sections": {"Encryption": "Photos are encrypted in transit with TLS and at rest with AES-256 in data "
                                "centers in the EU.",
                  "Reporting": "Report a security issue to our security team through the form on the "
                               "website; we answer within two business days."},
     "questions": ["are my photos encrypted", "where are your servers located",
                   "how do I report a security vulnerability"]},
    {"id": "policies/terms-content.md", "title": "Content rules",
     "sections": {"Allowed content": "You may store any legal content you own. Shared links that break the law "
                                     "or our rules are disabled."},
     "questions": ["what content am I allowed to store", "why was my shared link disabled",
                   "are there rules for what I can share"]},
    {"id": "policies/accessibility.md", "title": "Accessibility",
     "sections": {"Support": "The apps support screen readers, dynamic text size and high-contrast mode. "
                             "Keyboard shortcuts on the website are listed by pressing the question mark key."},
     "questions": ["does the app work with a screen reader", "are there keyboard shortcuts on the website",
                   "can I make the text bigger"]},
    {"id": "policies/service-status.md", "title": "Service status and outages",
     "sections": {"Status page": "Outages and maintenance are announced on status.skylark.example. Planned "
                                 "maintenance happens on Sunday mornings and is announced a week ahead."},
     "questions": ["is skylark down right now", "where can I see if there is an outage",
                   "when is planned maintenance"]},
]

# Out-of-scope questions the knowledge base does not answer (the right outcome: hand over, low confidence).
OUT_OF_SCOPE = [
    "what is the weather in paris tomorrow", "can you recommend a good pizza restaurant",
    "who won the football match yesterday", "how do I bake sourdough bread",
    "what is the capital of australia", "translate good morning into japanese",
    "write me a poem about the sea", "how tall is mount everest",
    "which stocks should I buy this year", "how do I fix my car's brakes",
]

# Requests for a person, sensitive topics (with the topic they are), and frustrated follow-ups.
HUMAN_REQUESTS = [
    "I want to talk to a human", "can I speak to a real person please", "transfer me to an agent",
    "let me speak with someone from support", "I need a human agent now", "please connect me to customer service",
    "is there a real person I can chat with", "I'd like to talk to a person about my account",
]
SENSITIVE = [
    ("legal", "my lawyer will contact you about my deleted photos"), ("legal", "I am going to sue skylark"),
    ("legal", "this is a legal matter about copyright on my photos"),
    ("security", "someone hacked my account and changed my email"),
    ("security", "I think my account was compromised"), ("security", "there are photos in my account that are not mine, was I hacked"),
    ("fraud", "there is a charge on my card I did not make"), ("fraud", "I was charged twice and I think it is fraud"),
]
FRUSTRATED = [
    "this is useless, nothing works", "I am so angry, your app lost my photos", "terrible service, I hate this",
    "this is the worst experience ever", "I'm fed up, it still doesn't work", "absolutely awful, I'm furious",
]
