"""Seeded generator of a synthetic home-improvement catalogue and shopper query log.

This is the project's default data: ``she demo`` and the tests run on it, so a fresh clone works
without downloads and without the Kaggle-licensed Home Depot rows. Every record carries the *true*
step facts (type relation, per-attribute match, specs met, negation) because the generator knows the
shopper's intent and the product it built; the label is then the guideline rule
(:func:`she.data.guideline.guideline_label`) applied to those facts. That is what makes the data
useful for stepwise rewards: a verifier can check each reasoning step against a fact that is right by
construction, and the final label is a deterministic consequence of the steps.

Pipeline (all pure functions driven by one ``random.Random(seed)``):

1. pick an *intent*: a product type plus stated constraints (brand / colour / size / material /
   function, or a negated feature such as "without sprayer") -- :class:`Intent`;
2. render it as a shopper query (lower-case, plural, word order, unit spelling, typos);
3. draw candidate products whose relation to the intent is chosen from the label mix: the exact
   item, the same type with one or more mismatches, a related type, an accessory/part of the type,
   an unrelated type -- :class:`Item`;
4. compute the facts (:func:`compute_facts`) and the label from the facts.

The world is closed: a product has exactly the attributes listed on it, and a negated feature is
present exactly when the product's function is in that feature's ``has`` set (:data:`NEGATABLE`).
See docs/synthetic.md for the knobs and the honest limits.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from she.data.guideline import label_from_facts
from she.data.labels import get_taxonomy
from she.data.schema import ATTRIBUTES, Product, Record, StepFacts, normalize_query
from she.errors import UserError

# --------------------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------------------


def _s(text: str) -> tuple[str, ...]:
    """Split a ``a|b|c`` table cell; an empty cell is an empty tuple."""
    return tuple(x.strip() for x in text.split("|") if x.strip())


@dataclass(frozen=True)
class ProductType:
    """One product type of the catalogue, with the vocabularies its products are drawn from.

    ``queries`` are the words shoppers use for the type (the first is the canonical one); none may
    imply an attribute value ("gas grill" would silently state a function the facts ignore);
    ``noun`` is the type as it appears in titles. ``extras`` are title words that are *not*
    attributes (product lines, sheens, bulb shapes): they make titles realistic without creating
    facts a query could state. ``accessories`` maps an accessory/part name to its sizes.
    """

    key: str
    noun: str
    category: str
    queries: tuple[str, ...]
    brands: tuple[str, ...]
    sizes: tuple[str, ...] = ()
    colors: tuple[str, ...] = ()
    materials: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    accessories: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def values(self, attribute: str) -> tuple[str, ...]:
        """The vocabulary of ``attribute`` (one of ``ATTRIBUTES``) for this type."""
        return {
            "brand": self.brands,
            "color": self.colors,
            "material": self.materials,
            "size": self.sizes,
            "function": self.functions,
        }[attribute]

    @property
    def accessory_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.accessories)


def _t(key: str, noun: str, category: str, queries: str, brands: str, sizes: str = "", colors: str = "",
       materials: str = "", functions: str = "", extras: str = "", accessories: str = "") -> ProductType:
    """Build a :class:`ProductType` from compact table cells.

    ``accessories`` is ``"name: size|size; name2; ..."``.
    """
    acc: list[tuple[str, tuple[str, ...]]] = []
    for part in accessories.split(";"):
        if not part.strip():
            continue
        name, _, sz = part.partition(":")
        acc.append((name.strip(), _s(sz)))
    return ProductType(key, noun, category, _s(queries), _s(brands), _s(sizes), _s(colors), _s(materials),
                       _s(functions), _s(extras), tuple(acc))


_PT = "DeWalt|Milwaukee|Ryobi|Makita|Bosch|Ridgid"
_CORD = "Cordless|Corded"
_FAUCET_FINISH = "Chrome|Brushed Nickel|Matte Black|Oil Rubbed Bronze|Champagne Bronze"
_HW_FINISH = "Satin Nickel|Matte Black|Oil Rubbed Bronze|Polished Chrome|Antique Brass"
_PAINT_COLORS = "Ultra Pure White|Swiss Coffee|Light Gray|Navy Blue|Sage Green|Greige"
_PAINT_ACC = ("paint roller: 9 in.|4 in.; paint brush: 2 in.|2-1/2 in.|3 in.; paint tray: 9 in.|11 in.; "
              "painter's tape: 1.41 in. x 60 yd.|1.88 in. x 60 yd.")

_TYPES: tuple[ProductType, ...] = (
    # ---- power tools
    _t("drill", "Drill/Driver", "Power Tools", "drill|drill driver|power drill", _PT, "1/2 in.|3/8 in.",
       functions=_CORD, extras="Compact|Variable Speed|2-Speed|Heavy-Duty",
       accessories="drill bit set: 14-Piece|21-Piece|29-Piece; battery pack: 2.0 Ah|4.0 Ah|5.0 Ah; "
                   "battery charger: 12-Volt|18-Volt|20-Volt; drill holster"),
    _t("impact driver", "Impact Driver", "Power Tools", "impact driver|impact screwdriver", _PT,
       "1/4 in.|3/8 in.", functions=_CORD, extras="Compact|3-Speed|Heavy-Duty",
       accessories="impact bit set: 30-Piece|40-Piece|60-Piece; battery pack: 2.0 Ah|5.0 Ah; "
                   "battery charger: 18-Volt|20-Volt"),
    _t("hammer drill", "Hammer Drill", "Power Tools", "hammer drill|masonry drill", _PT, "1/2 in.|5/8 in.",
       functions=_CORD, extras="2-Speed|Heavy-Duty",
       accessories="masonry drill bit set: 5-Piece|7-Piece; battery pack: 4.0 Ah|5.0 Ah; side handle"),
    _t("rotary hammer", "SDS-Plus Rotary Hammer", "Power Tools", "rotary hammer|sds rotary hammer|sds drill",
       "DeWalt|Milwaukee|Makita|Bosch|Hilti", "1 in.|1-1/8 in.", functions=_CORD,
       accessories="SDS-plus bit set: 5-Piece|7-Piece; SDS-plus chisel: 10 in.|12 in.; dust extractor"),
    _t("circular saw", "Circular Saw", "Power Tools", "circular saw|skill saw", _PT + "|Skil",
       "7-1/4 in.|6-1/2 in.", functions=_CORD, extras="Sidewinder|Worm Drive|Magnesium Shoe",
       accessories="circular saw blade: 24-Tooth|40-Tooth|60-Tooth; edge guide; battery pack: 5.0 Ah"),
    _t("miter saw", "Miter Saw", "Power Tools", "miter saw|chop saw", "DeWalt|Milwaukee|Makita|Bosch|Ryobi|Metabo HPT",
       "10 in.|12 in.|7-1/4 in.", functions="Sliding Compound|Compound|Dual-Bevel Sliding",
       accessories="miter saw blade: 60-Tooth|80-Tooth; miter saw stand; dust bag"),
    _t("table saw", "Table Saw", "Power Tools", "table saw", "DeWalt|SawStop|Ryobi|Bosch|Skil",
       "10 in.|8-1/4 in.", functions="Jobsite|Contractor|Cabinet",
       accessories="table saw blade: 40-Tooth|60-Tooth; dado blade set: 8 in.; table saw stand"),
    _t("jigsaw", "Jig Saw", "Power Tools", "jigsaw|jig saw", _PT + "|Black+Decker", functions=_CORD,
       extras="Orbital|Top-Handle|Barrel-Grip",
       accessories="jigsaw blade set: 10-Piece|20-Piece; battery pack: 2.0 Ah|4.0 Ah"),
    _t("reciprocating saw", "Reciprocating Saw", "Power Tools", "reciprocating saw|sawzall|recip saw", _PT,
       functions=_CORD, extras="Compact|One-Handed|Orbital",
       accessories="reciprocating saw blade set: 6-Piece|12-Piece; battery pack: 5.0 Ah|8.0 Ah"),
    _t("orbital sander", "Random Orbital Sander", "Power Tools", "orbital sander|random orbital sander",
       _PT + "|Festool", "5 in.|6 in.", functions=_CORD, extras="Variable Speed|Low-Vibration",
       accessories="sanding disc pack: 80-Grit|120-Grit|220-Grit; dust bag; hook and loop pad"),
    _t("belt sander", "Belt Sander", "Power Tools", "belt sander", "Makita|DeWalt|Ryobi|Bosch|Black+Decker",
       "3 in. x 21 in.|3 in. x 18 in.|4 in. x 24 in.", functions=_CORD, extras="Variable Speed",
       accessories="sanding belt pack: 80-Grit|120-Grit; dust bag"),
    _t("nail gun", "Nailer", "Power Tools", "nail gun|nailer", "Ryobi|Milwaukee|DeWalt|Bostitch|Metabo HPT|Porter-Cable",
       "18-Gauge|16-Gauge|15-Gauge", functions="Pneumatic|Cordless",
       accessories="brad nails: 1-1/4 in.|2 in.; air hose: 25 ft.|50 ft.; air compressor: 2 gal.|6 gal."),
    _t("staple gun", "Staple Gun", "Power Tools", "staple gun|stapler", "Arrow|Stanley|Surebonder|Ryobi|DeWalt",
       "1/4 in.|3/8 in.|9/16 in.", functions="Manual|Electric|Cordless", extras="Heavy-Duty|Forward-Action",
       accessories="staples: 1/4 in.|3/8 in.|1/2 in.; staple remover"),
    # ---- hand tools and storage
    _t("hammer", "Hammer", "Hand Tools", "hammer|claw hammer", "Estwing|Stanley|Husky|Vaughan|Klein Tools",
       "16 oz.|20 oz.|22 oz.", materials="Steel|Fiberglass|Wood", functions="Curved Claw|Rip Claw|Framing",
       extras="Smooth Face|Milled Face",
       accessories="hammer holster; replacement hammer handle: 16 in.|18 in."),
    _t("tool box", "Tool Box", "Tool Storage", "tool box|toolbox", "Husky|Milwaukee|DeWalt|Stanley|Craftsman|Keter",
       "16 in.|22 in.|26 in.", "Black|Red|Yellow|Gray", "Plastic|Steel|Aluminum", "Rolling|Portable|Modular",
       extras="Pro|Connect",
       accessories="tool box organizer: 10-Compartment|18-Compartment; removable tool tray"),
    _t("tool bag", "Tool Bag", "Tool Storage", "tool bag", "Husky|Milwaukee|Klein Tools|DeWalt|Veto Pro Pac",
       "12 in.|16 in.|20 in.", "Black|Gray|Red|Yellow|Orange", "Polyester|Canvas|Nylon", "Open Top|Zippered|Backpack",
       accessories="shoulder strap; tool pouch: 6-Pocket|12-Pocket"),
    # ---- ladders
    _t("extension ladder", "Extension Ladder", "Ladders", "extension ladder", "Werner|Little Giant|Louisville Ladder|Gorilla Ladders",
       "16 ft.|20 ft.|24 ft.|28 ft.", materials="Aluminum|Fiberglass",
       functions="Type I Duty|Type IA Duty|Type IAA Duty",
       accessories="ladder stabilizer; ladder leveler; ladder hook"),
    _t("step ladder", "Step Ladder", "Ladders", "step ladder|stepladder", "Werner|Little Giant|Louisville Ladder|Gorilla Ladders|Husky",
       "4 ft.|6 ft.|8 ft.|10 ft.", materials="Aluminum|Fiberglass", functions="Type I Duty|Type IA Duty|Type IAA Duty",
       accessories="ladder tool tray; ladder leveler"),
    # ---- plumbing
    _t("kitchen faucet", "Kitchen Faucet", "Plumbing", "kitchen faucet|kitchen sink faucet",
       "Moen|Delta|Kohler|Pfister|Glacier Bay|American Standard", "1-Hole|3-Hole|4-Hole", _FAUCET_FINISH,
       "Brass|Stainless Steel|Zinc", "Pull-Down Sprayer|Side Sprayer|Single-Handle|Two-Handle",
       extras="Arbor|Essie|Bellera|Trinsic|High-Arc",
       accessories="faucet aerator: 1.5 GPM|2.2 GPM; faucet cartridge; supply line: 16 in.|20 in.|24 in.; "
                   "pull-down hose: 59 in.|68 in."),
    _t("bathroom faucet", "Bathroom Faucet", "Plumbing", "bathroom faucet|bathroom sink faucet|lavatory faucet",
       "Moen|Delta|Kohler|Pfister|Glacier Bay|American Standard", "4 in. Centerset|8 in. Widespread|Single Hole",
       _FAUCET_FINISH, "Brass|Zinc", "Single-Handle|Two-Handle|Touchless|Waterfall",
       extras="Eva|Wynford|Cassidy|Low-Arc",
       accessories="pop-up drain; faucet aerator: 1.2 GPM|1.5 GPM; faucet cartridge; supply line: 16 in.|20 in."),
    _t("shower head", "Shower Head", "Plumbing", "shower head|showerhead", "Moen|Delta|Kohler|Pfister|Glacier Bay|Speakman",
       "6 in.|8 in.|10 in.", "Chrome|Brushed Nickel|Matte Black|Oil Rubbed Bronze", "Plastic|Brass|Stainless Steel",
       "Rainfall|Multi-Spray|Single-Spray|Massaging", extras="WaterSense|High-Pressure|Eco",
       accessories="shower arm: 6 in.|10 in.|16 in.; shower hose: 60 in.|72 in.; shower arm flange; shower filter"),
    _t("handheld shower", "Handheld Shower Head", "Plumbing", "handheld shower|hand held shower head|handheld shower head",
       "Moen|Delta|Kohler|Pfister|Glacier Bay|Waterpik", "4 in.|5 in.", "Chrome|Brushed Nickel|Matte Black|Oil Rubbed Bronze",
       "Plastic|Brass", "Multi-Spray|Single-Spray|Massaging", extras="WaterSense|Magnetic Docking",
       accessories="shower hose: 60 in.|72 in.; handheld shower holder"),
    _t("water heater", "Tank Water Heater", "Plumbing", "water heater|hot water heater|tank water heater",
       "Rheem|A.O. Smith|Bradford White|State", "30 gal.|40 gal.|50 gal.", functions="Gas|Electric|Hybrid Heat Pump",
       extras="Tall|Short|6-Year Warranty",
       accessories="water heater element: 4500-Watt|5500-Watt; anode rod; expansion tank: 2 gal.|4.5 gal.; "
                   "water heater drain pan: 24 in.|26 in."),
    _t("tankless water heater", "Tankless Water Heater", "Plumbing", "tankless water heater|on demand water heater",
       "Rinnai|Rheem|Navien|EcoSmart", "5.3 GPM|9.8 GPM|11 GPM", functions="Natural Gas|Propane|Electric",
       extras="Indoor|Outdoor|Condensing",
       accessories="tankless flush kit; tankless vent kit: 3 in.|4 in."),
    # ---- paint
    _t("interior paint", "Interior Paint", "Paint", "interior paint|wall paint|paint", "Behr|Glidden|Valspar|PPG",
       "1 gal.|5 gal.|1 qt.", _PAINT_COLORS, "Latex|Acrylic|Alkyd", "Low-VOC|Zero-VOC|One-Coat|Scrubbable",
       extras="Flat|Eggshell|Satin|Semi-Gloss", accessories=_PAINT_ACC),
    _t("exterior paint", "Exterior Paint", "Paint", "exterior paint|outdoor paint|house paint", "Behr|Glidden|Valspar|PPG",
       "1 gal.|5 gal.", _PAINT_COLORS, "Latex|Acrylic|Oil-Based", "Low-VOC|Zero-VOC|Mildew-Resistant|Self-Priming",
       extras="Flat|Satin|Semi-Gloss", accessories=_PAINT_ACC + "; paint sprayer: 0.5 gal.|1.5 gal."),
    _t("primer", "Primer", "Paint", "primer|paint primer|primer sealer", "Kilz|Zinsser|Behr|Glidden",
       "1 gal.|5 gal.|1 qt.", "White|Gray Tintable", "Latex|Oil-Based|Shellac",
       "Stain-Blocking|Bonding|Mold-Resistant|Zero-VOC", extras="Interior|Interior/Exterior",
       accessories=_PAINT_ACC),
    _t("deck stain", "Deck Stain", "Paint", "deck stain|wood stain|exterior stain",
       "Behr|Thompson's WaterSeal|Cabot|Olympic|Ready Seal", "1 gal.|5 gal.",
       "Cedar|Redwood|Natural|Chestnut Brown|Slate Gray", "Oil-Based|Water-Based",
       "Transparent|Semi-Transparent|Solid Color|Waterproofing", extras="Premium|Advanced",
       accessories="stain applicator pad: 9 in.; deck brush; deck cleaner: 1 gal.; stain brush: 4 in."),
    _t("spray paint", "Spray Paint", "Paint", "spray paint", "Rust-Oleum|Krylon|Valspar", "12 oz.|11 oz.|15 oz.",
       "Black|White|Red|Silver|Hunter Green", "Enamel|Acrylic Lacquer|Oil-Based", "Gloss|Flat|Satin|Metallic|Hammered",
       extras="Painter's Touch|2X Ultra Cover|Fusion",
       accessories="spray paint grip; replacement spray nozzle"),
    # ---- lighting and electrical
    _t("light bulb", "LED Light Bulb", "Lighting", "light bulb|led bulb|led light bulb",
       "Philips|GE|Feit Electric|Cree|Sylvania|EcoSmart",
       "40-Watt Equivalent|60-Watt Equivalent|75-Watt Equivalent|100-Watt Equivalent", "Soft White|Daylight|Bright White",
       functions="Dimmable|Smart Color-Changing|3-Way|Shatter-Resistant", extras="A19|A21|BR30",
       accessories="light bulb changer: 6 ft.|12 ft.; socket adapter"),
    _t("led tube light", "LED Tube Light", "Lighting", "led tube light|led tube",
       "Philips|GE|Feit Electric|Sylvania|Lithonia Lighting", "2 ft.|4 ft.|8 ft.", "Daylight|Cool White|Soft White",
       functions="Ballast Bypass|Plug and Play|Hybrid", extras="T8|T12",
       accessories="tombstone socket; tube guard: 4 ft."),
    _t("ceiling fan", "Ceiling Fan", "Lighting", "ceiling fan", "Hunter|Hampton Bay|Home Decorators Collection|Minka-Aire|Westinghouse",
       "44 in.|52 in.|60 in.", "Matte Black|Brushed Nickel|White|Oil Rubbed Bronze", "Wood|Metal|Plastic",
       "with Integrated LED Light|Indoor/Outdoor|Smart Wi-Fi|Low Profile", extras="Dempsey|Glendale|Ashby",
       accessories="ceiling fan light kit; downrod: 12 in.|24 in.|36 in.; fan remote control; replacement fan blades"),
    _t("tower fan", "Tower Fan", "Lighting", "tower fan", "Lasko|Honeywell|Vornado|Hampton Bay|Dreo", "36 in.|42 in.|48 in.",
       "Black|White|Gray|Silver", functions="Oscillating|Bladeless|Remote Control", extras="Quiet|3-Speed",
       accessories="fan remote control; fan cleaning brush"),
    _t("pendant light", "Pendant Light", "Lighting", "pendant light|pendant|hanging light",
       "Hampton Bay|Home Decorators Collection|Progress Lighting|Globe Electric|Kichler", "1-Light|3-Light|5-Light",
       "Matte Black|Brushed Nickel|Antique Brass|Chrome|Oil Rubbed Bronze", "Glass|Metal|Rattan", "Plug-In|Hardwired",
       extras="Mini|Farmhouse|Industrial",
       accessories="pendant shade; pendant conversion kit; ceiling canopy kit"),
    _t("flush mount light", "Flush Mount Light", "Lighting", "flush mount light|flush mount|ceiling light",
       "Hampton Bay|Commercial Electric|Progress Lighting|Home Decorators Collection|Kichler", "11 in.|13 in.|15 in.",
       "Brushed Nickel|Matte Black|White|Oil Rubbed Bronze", "Glass|Metal|Acrylic", "Integrated LED|Motion Sensing|Bulb-Based",
       extras="Low Profile|Round|Square",
       accessories="fixture glass shade; ceiling medallion: 12 in.|16 in.; fixture mounting bracket"),
    _t("light switch", "Light Switch", "Electrical", "light switch|wall switch", "Leviton|Lutron|Legrand|Eaton",
       "15 Amp|20 Amp", "White|Light Almond|Black|Ivory", functions="Single-Pole|3-Way|Smart Wi-Fi|Rocker",
       extras="Decora|Toggle|Commercial Grade",
       accessories="switch wall plate: 1-Gang|2-Gang|3-Gang; electrical box: 1-Gang|2-Gang"),
    _t("dimmer switch", "Dimmer Switch", "Electrical", "dimmer switch|dimmer|light dimmer", "Lutron|Leviton|Legrand|Eaton",
       "150-Watt LED|600-Watt", "White|Light Almond|Black|Ivory", functions="Single-Pole/3-Way|Smart Wi-Fi|Slide|Rotary",
       extras="Diva|Decora|Skylark",
       accessories="switch wall plate: 1-Gang|2-Gang; electrical box: 1-Gang"),
    _t("extension cord", "Extension Cord", "Electrical", "extension cord|power cord", "Husky|Southwire|Woods|HDX|Coleman Cable",
       "6 ft.|25 ft.|50 ft.|100 ft.", "Orange|Green|Yellow|Black|White", functions="Indoor|Outdoor|Lighted End",
       extras="16/3|14/3|12/3",
       accessories="cord reel; outlet adapter: 3-Outlet; cord cover: 5 ft.|15 ft."),
    _t("power strip", "Power Strip", "Electrical", "power strip|outlet strip", "Belkin|GE|Tripp Lite|Commercial Electric|APC",
       "6-Outlet|8-Outlet|12-Outlet", "Black|White|Gray", functions="Surge Protection|USB Charging|Smart Wi-Fi|Basic",
       extras="6 ft. Cord|Flat Plug",
       accessories="outlet adapter: 3-Outlet; cord cover: 5 ft."),
    # ---- hardware
    _t("door lock", "Deadbolt", "Hardware", "door lock|deadbolt|front door lock", "Kwikset|Schlage|Defiant|Yale|Baldwin",
       colors="Satin Nickel|Venetian Bronze|Matte Black|Polished Brass|Aged Bronze", materials="Zinc|Brass|Steel",
       functions="Keyed Entry|Electronic Keypad|Smart Wi-Fi Keypad|Double Cylinder",
       extras="SmartKey|Grade 1|Grade 2",
       accessories="strike plate; rekey kit; door reinforcement plate"),
    _t("door knob", "Door Knob", "Hardware", "door knob|doorknob|door handle", "Kwikset|Schlage|Defiant|Baldwin|Copper Creek",
       colors="Satin Nickel|Venetian Bronze|Matte Black|Polished Brass|Aged Bronze", materials="Zinc|Brass|Steel",
       functions="Passage|Privacy|Keyed Entry|Dummy", extras="Tylo|Juno|Round|Ball",
       accessories="door knob latch; strike plate; door stop: 3 in.|4 in."),
    _t("cabinet hinge", "Cabinet Hinge", "Hardware", "cabinet hinge|kitchen cabinet hinge",
       "Liberty|Amerock|Everbilt|Blum|Richelieu", "1/2 in. Overlay|Full Overlay|3/8 in. Inset", _HW_FINISH,
       "Steel|Zinc|Brass", "Soft-Close|Self-Closing|Free-Swinging", extras="Concealed|Face Frame|Euro",
       accessories="hinge mounting plate; hinge screws: #6 x 5/8 in.|#8 x 1 in.; hinge cover cap"),
    _t("door hinge", "Door Hinge", "Hardware", "door hinge", "Everbilt|National Hardware|Stanley|Schlage",
       "3 in.|3-1/2 in.|4 in.", "Satin Nickel|Matte Black|Oil Rubbed Bronze|Polished Brass|White",
       "Steel|Brass|Stainless Steel", "Square Corner|Round Corner|Spring-Loaded", extras="Residential|Heavy-Duty",
       accessories="hinge pin; hinge screws: #9 x 3/4 in.; hinge shim"),
    _t("cabinet pull", "Cabinet Pull", "Hardware", "cabinet pull|drawer pull|cabinet handle",
       "Liberty|Amerock|Hickory Hardware|Richelieu|Home Decorators Collection", "3 in.|3-3/4 in.|5-1/16 in.|6-5/16 in.",
       _HW_FINISH, "Zinc|Stainless Steel|Brass|Aluminum", "Bar|Cup|Arch|Edge", extras="Modern|Classic|Farmhouse",
       accessories="cabinet hardware jig; pull backplate: 3 in.|96 mm"),
    _t("cabinet knob", "Cabinet Knob", "Hardware", "cabinet knob|drawer knob", "Liberty|Amerock|Hickory Hardware|Richelieu",
       "1 in.|1-1/4 in.|1-3/8 in.", _HW_FINISH, "Zinc|Stainless Steel|Brass", "Round|Square|T-Bar|Mushroom",
       extras="Modern|Classic",
       accessories="cabinet hardware jig; knob backplate: 1-1/2 in."),
    # ---- flooring and bath
    _t("floor tile", "Floor and Wall Tile", "Flooring", "floor tile|tile|bathroom floor tile",
       "Daltile|MSI|Florida Tile|TrafficMaster|Marazzi", "12 in. x 24 in.|12 in. x 12 in.|24 in. x 24 in.|3 in. x 6 in.",
       "White|Gray|Beige|Black|Carrara", "Porcelain|Ceramic|Marble|Glass", "Matte|Polished|Wood Look",
       extras="Rectified|Glazed",
       accessories="tile spacers: 1/16 in.|1/8 in.; tile adhesive: 1 gal.; grout: 10 lb.|25 lb.; tile trowel: 1/4 in."),
    _t("vinyl plank flooring", "Luxury Vinyl Plank Flooring", "Flooring", "vinyl plank flooring|lvp flooring|vinyl flooring",
       "LifeProof|TrafficMaster|Home Decorators Collection|Shaw", "6 in. x 36 in.|7.1 in. x 48 in.|8.7 in. x 59.4 in.",
       "Sterling Oak|Gray|Natural Oak|Walnut|Driftwood", "Vinyl|Stone Plastic Composite|Wood Plastic Composite",
       "Waterproof|Click Lock|Glue Down", extras="12 mil|20 mil",
       accessories="flooring underlayment: 100 sq. ft.; quarter round molding: 94 in.; transition strip; flooring spacers"),
    _t("bathroom vanity", "Bath Vanity", "Bath", "bathroom vanity|vanity|bath vanity",
       "Glacier Bay|Home Decorators Collection|Kohler|Foremost|Design House", "24 in.|30 in.|36 in.|48 in.|60 in.",
       "White|Gray|Espresso|Navy Blue|Natural Oak", "Solid Wood|MDF|Plywood",
       "with Marble Top|with Cultured Marble Top|Cabinet Only", extras="Shaker|Freestanding|Modern",
       accessories="vanity top: 31 in.|37 in.; vanity backsplash; sink drain"),
    _t("pedestal sink", "Pedestal Sink", "Bath", "pedestal sink|pedestal bathroom sink",
       "American Standard|Kohler|Glacier Bay|Foremost", "20 in.|24 in.|27 in.", "White|Biscuit",
       "Vitreous China|Ceramic", "Rectangular|Oval|Square", extras="Single Faucet Hole|8 in. Widespread",
       accessories="sink drain; sink mounting bracket"),
    # ---- outdoor
    _t("lawn mower", "Lawn Mower", "Outdoor", "lawn mower|mower|lawnmower", "Toro|Honda|Ryobi|Ego|Craftsman|Greenworks",
       "20 in.|21 in.|22 in.|30 in.", functions="Gas Self-Propelled|Gas Push|Cordless Electric|Corded Electric",
       extras="Recycler|High-Wheel|3-in-1",
       accessories="mower blade: 20 in.|21 in.; spark plug; mower bag; mower air filter"),
    _t("riding lawn mower", "Riding Lawn Mower", "Outdoor", "riding lawn mower|riding mower",
       "Cub Cadet|John Deere|Toro|Husqvarna|Craftsman", "42 in.|46 in.|54 in.",
       functions="Gas Hydrostatic|Gas Zero-Turn|Battery Electric", extras="V-Twin|Fabricated Deck",
       accessories="mower blade: 42 in.|46 in.; riding mower cover; bagger kit; spark plug"),
    _t("string trimmer", "String Trimmer", "Outdoor", "string trimmer|weed eater|weed wacker",
       "Ego|Ryobi|Stihl|Husqvarna|Echo|Greenworks", "13 in.|15 in.|16 in.", functions="Gas|Cordless|Corded Electric",
       extras="Straight Shaft|Curved Shaft|Attachment Capable",
       accessories="trimmer line: .080 in.|.095 in.; trimmer head; edger attachment; battery pack: 2.5 Ah|5.0 Ah"),
    _t("hedge trimmer", "Hedge Trimmer", "Outdoor", "hedge trimmer|hedge clipper",
       "Ego|Ryobi|Stihl|Black+Decker|Greenworks", "18 in.|22 in.|24 in.", functions="Gas|Cordless|Corded Electric",
       extras="Dual-Action|Rotating Handle",
       accessories="hedge trimmer blade cover; sharpening file; battery pack: 2.0 Ah"),
    _t("garden hose", "Garden Hose", "Outdoor", "garden hose|water hose|hose", "Flexzilla|Gilmour|Swan|Teknor Apex|HDX",
       "1/2 in. x 25 ft.|5/8 in. x 50 ft.|5/8 in. x 100 ft.|3/4 in. x 75 ft.", "Green|Black|Gray|Blue",
       "Rubber|Vinyl|Hybrid Polymer", "Kink-Resistant|Drinking Water Safe|Lightweight", extras="Heavy-Duty|Pro",
       accessories="hose nozzle: 7-Pattern|10-Pattern; hose reel: 150 ft.|200 ft.; hose repair kit; hose splitter"),
    _t("soaker hose", "Soaker Hose", "Outdoor", "soaker hose|drip hose", "Gilmour|Swan|Melnor|Rain Bird",
       "1/2 in. x 25 ft.|1/2 in. x 50 ft.|3/8 in. x 100 ft.", "Black|Green", "Recycled Rubber|Vinyl", "Flat|Round",
       accessories="hose timer; hose splitter; hose end cap"),
    _t("grill", "Grill", "Outdoor", "grill|bbq grill|barbecue grill", "Weber|Char-Broil|Nexgrill|Dyna-Glo",
       "2-Burner|3-Burner|4-Burner", "Black|Silver|Red|Blue", "Stainless Steel|Cast Iron|Porcelain-Coated Steel",
       "Propane|Natural Gas|Charcoal", extras="Spirit|Genesis|Performance",
       accessories="grill cover: 58 in.|65 in.; grill brush; propane tank: 20 lb.; grill grates"),
    _t("smoker", "Smoker", "Outdoor", "smoker|bbq smoker|meat smoker", "Masterbuilt|Char-Broil|Traeger|Dyna-Glo|Pit Boss",
       "30 in.|36 in.|40 in.", "Black|Bronze|Silver", "Steel|Stainless Steel|Cast Iron", "Electric|Pellet|Charcoal|Propane",
       extras="Vertical|Digital|Offset",
       accessories="smoker wood chips: 2 lb.|5 lb.; smoker cover: 30 in.|40 in.; meat thermometer"),
)

CATALOGUE: dict[str, ProductType] = {t.key: t for t in _TYPES}
"""Product types by key, in a fixed order (iteration order is part of determinism)."""

_RELATED_PAIRS: tuple[tuple[str, str], ...] = (
    ("drill", "impact driver"), ("drill", "hammer drill"), ("hammer drill", "rotary hammer"),
    ("circular saw", "miter saw"), ("circular saw", "jigsaw"), ("miter saw", "table saw"), ("circular saw", "table saw"),
    ("jigsaw", "reciprocating saw"), ("orbital sander", "belt sander"), ("hammer", "nail gun"),
    ("nail gun", "staple gun"), ("tool box", "tool bag"), ("extension ladder", "step ladder"),
    ("kitchen faucet", "bathroom faucet"), ("shower head", "handheld shower"),
    ("water heater", "tankless water heater"), ("interior paint", "exterior paint"), ("interior paint", "primer"),
    ("interior paint", "spray paint"), ("exterior paint", "deck stain"), ("exterior paint", "spray paint"),
    ("light bulb", "led tube light"), ("ceiling fan", "tower fan"), ("pendant light", "flush mount light"),
    ("light switch", "dimmer switch"), ("extension cord", "power strip"), ("door lock", "door knob"),
    ("cabinet hinge", "door hinge"), ("cabinet pull", "cabinet knob"), ("floor tile", "vinyl plank flooring"),
    ("bathroom vanity", "pedestal sink"), ("lawn mower", "riding lawn mower"), ("string trimmer", "hedge trimmer"),
    ("garden hose", "soaker hose"), ("grill", "smoker"),
)


def _build_related(pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """Symmetric related-type table (a usable alternative is an alternative both ways)."""
    out: dict[str, list[str]] = {k: [] for k in CATALOGUE}
    for a, b in pairs:
        for x, y in ((a, b), (b, a)):
            if x not in CATALOGUE:
                raise ValueError(f"related pair names unknown type {x!r}")
            if y not in out[x]:
                out[x].append(y)
    return {k: tuple(v) for k, v in out.items()}


RELATED: dict[str, tuple[str, ...]] = _build_related(_RELATED_PAIRS)
"""type key -> related type keys (symmetric)."""


@dataclass(frozen=True)
class Negatable:
    """A feature a shopper can exclude ("without sprayer", "non cordless", "no voc").

    ``has`` lists the function values that *have* the feature; in this closed world every other
    function value (and a product with no function) lacks it. ``templates`` render the negated
    query (``{t}`` is the type word); ``types`` are the catalogue types negation queries are built
    for -- each offers functions with and without the feature, so both an exact item and a
    same-type mismatch exist.
    """

    feature: str
    has: frozenset[str]
    templates: tuple[str, ...]
    types: tuple[str, ...]


_COATINGS_WITH_VOC = ("Low-VOC", "One-Coat", "Scrubbable", "Mildew-Resistant", "Self-Priming", "Stain-Blocking",
                      "Bonding", "Mold-Resistant", "Transparent", "Semi-Transparent", "Solid Color", "Waterproofing",
                      "Gloss", "Flat", "Satin", "Metallic", "Hammered")
_LIGHT_EMITTING = ("with Integrated LED Light", "Integrated LED", "Motion Sensing", "Bulb-Based", "Plug-In", "Hardwired",
                   "Dimmable", "Smart Color-Changing", "3-Way", "Shatter-Resistant", "Ballast Bypass", "Plug and Play",
                   "Hybrid")

NEGATABLE: dict[str, Negatable] = {
    n.feature: n
    for n in (
        Negatable("cordless", frozenset({"Cordless", "Cordless Electric", "Battery Electric"}),
                  ("non cordless {t}", "non-cordless {t}", "{t} not cordless"),
                  ("drill", "impact driver", "hammer drill", "circular saw", "jigsaw", "reciprocating saw",
                   "nail gun", "lawn mower", "string trimmer", "hedge trimmer")),
        Negatable("sprayer", frozenset({"Pull-Down Sprayer", "Side Sprayer"}),
                  ("{t} without sprayer", "{t} no sprayer", "{t} without spray"), ("kitchen faucet",)),
        # Every coating not sold as Zero-VOC contains VOCs; non-coatings contain none.
        Negatable("voc", frozenset(_COATINGS_WITH_VOC),
                  ("no voc {t}", "no vocs {t}", "{t} without vocs", "{t} no voc"),
                  ("interior paint", "exterior paint", "primer")),
        Negatable("light", frozenset(_LIGHT_EMITTING),
                  ("{t} without light", "{t} no light", "{t} without light kit"), ("ceiling fan",)),
        Negatable("keypad", frozenset({"Electronic Keypad", "Smart Wi-Fi Keypad"}),
                  ("{t} without keypad", "non keypad {t}", "{t} no keypad"), ("door lock",)),
        Negatable("gas", frozenset({"Gas", "Gas Self-Propelled", "Gas Push", "Gas Hydrostatic", "Gas Zero-Turn",
                                    "Natural Gas", "Propane"}),
                  ("non gas {t}", "{t} not gas", "{t} no gas"),
                  ("lawn mower", "riding lawn mower", "string trimmer", "water heater", "tankless water heater",
                   "grill", "smoker")),
        Negatable("dimmable", frozenset({"Dimmable", "Smart Color-Changing"}),
                  ("non dimmable {t}", "{t} not dimmable"), ("light bulb",)),
        Negatable("top", frozenset({"with Marble Top", "with Cultured Marble Top"}),
                  ("{t} without top", "{t} no top", "{t} without countertop"), ("bathroom vanity",)),
    )
}
"""feature -> :class:`Negatable`."""


def _build_negation_types() -> dict[str, tuple[str, ...]]:
    """type key -> features negation queries are built for; checks each type has both sides."""
    out: dict[str, list[str]] = {}
    for feature, n in NEGATABLE.items():
        for key in n.types:
            if key not in CATALOGUE:
                raise ValueError(f"negatable feature {feature!r} names unknown type {key!r}")
            funcs = CATALOGUE[key].functions
            if not (any(f in n.has for f in funcs) and any(f not in n.has for f in funcs)):
                raise ValueError(f"type {key!r} needs functions with and without {feature!r}")
            out.setdefault(key, []).append(feature)
    return {k: tuple(v) for k, v in out.items()}


NEGATION_TYPES: dict[str, tuple[str, ...]] = _build_negation_types()
"""type key -> negatable features for which negation queries are generated."""

# Generic accessory brands per category, so accessories are not always from the tool maker.
_ACCESSORY_BRANDS: dict[str, tuple[str, ...]] = {
    "Power Tools": ("Husky", "Everbilt", "Diablo", "Freud"),
    "Hand Tools": ("Husky", "Everbilt"),
    "Tool Storage": ("Husky", "Everbilt"),
    "Ladders": ("Werner", "Husky"),
    "Plumbing": ("Everbilt", "Danco", "Glacier Bay", "Fluidmaster"),
    "Paint": ("Wooster", "Purdy", "ScotchBlue", "HDX"),
    "Lighting": ("Commercial Electric", "Westinghouse", "Hampton Bay"),
    "Electrical": ("Commercial Electric", "Leviton", "Husky"),
    "Hardware": ("Everbilt", "Defiant"),
    "Flooring": ("QEP", "Custom Building Products", "TrafficMaster"),
    "Bath": ("Glacier Bay", "Everbilt"),
    "Outdoor": ("Arnold", "Oregon", "Melnor", "Husqvarna"),
}

# Categories whose accessories come in the parent's finishes (a downrod in brushed nickel, a switch
# plate in white); a paint roller does not come "in Navy Blue".
_FINISHED_ACCESSORIES = ("Plumbing", "Hardware", "Lighting", "Electrical")

# --------------------------------------------------------------------------------------------------
# Intents, items, facts
# --------------------------------------------------------------------------------------------------

QUERY_TYPES = ("type_only", "brand", "attribute", "multi_attribute", "negation", "typo")
"""query_meta["query_type"] vocabulary. ``typo`` and ``negation`` take precedence; a typo query keeps
its underlying kind in query_meta["base_query_type"]."""

_BASE_QUERY_MIX: dict[str, float] = {"type_only": 0.15, "brand": 0.25, "attribute": 0.30, "multi_attribute": 0.30}

DEFAULT_LABEL_MIX: dict[str, dict[str, float]] = {
    # More Exact/Partial than Irrelevant, as in real logs, but every class >= 15% so Macro F1 means something.
    "hd3": {"Exact": 0.40, "Partial": 0.38, "Irrelevant": 0.22},
    "esci4": {"Exact": 0.40, "Substitute": 0.26, "Complement": 0.17, "Irrelevant": 0.17},
}

# Candidate kinds drawn for each label, with within-label weights.
_KINDS_FOR_LABEL: dict[str, dict[str, tuple[tuple[str, float], ...]]] = {
    "hd3": {
        "Exact": (("exact", 1.0),),
        "Partial": (("same_mismatch", 0.7), ("related", 0.3)),
        "Irrelevant": (("accessory", 0.5), ("different", 0.5)),
    },
    "esci4": {
        "Exact": (("exact", 1.0),),
        "Substitute": (("same_mismatch", 0.7), ("related", 0.3)),
        "Complement": (("accessory", 1.0),),
        "Irrelevant": (("different", 1.0),),
    },
}


@dataclass(frozen=True)
class Intent:
    """What the shopper wants: a product type, stated attribute values, maybe a negated feature.

    ``constraints`` maps attribute names (``ATTRIBUTES``) to canonical catalogue values. A negated
    feature occupies the ``function`` slot, so ``constraints`` must not also state a function.
    """

    type: str
    constraints: Mapping[str, str] = field(default_factory=dict)
    negated: str | None = None

    def __post_init__(self) -> None:
        if self.type not in CATALOGUE:
            raise ValueError(f"Intent.type {self.type!r} is not a catalogue type")
        bad = [a for a in self.constraints if a not in ATTRIBUTES]
        if bad:
            raise ValueError(f"Intent.constraints has unknown attribute(s) {bad}; expected {ATTRIBUTES}")
        if self.negated is not None:
            if self.negated not in NEGATABLE:
                raise ValueError(f"Intent.negated {self.negated!r} is not one of {list(NEGATABLE)}")
            if "function" in self.constraints:
                raise ValueError("Intent cannot both state a function and negate a feature")


@dataclass(frozen=True)
class Item:
    """A generated product before it becomes a :class:`Product`. ``type`` is a catalogue type key or
    an accessory name; ``parent`` is the type an accessory belongs to."""

    type: str
    title: str
    description: str
    brand: str | None = None
    color: str | None = None
    size: str | None = None
    material: str | None = None
    function: str | None = None
    parent: str | None = None

    def get(self, attribute: str) -> str | None:
        return getattr(self, attribute)

    def to_product(self) -> Product:
        attrs = {"type": self.type}
        for a in ("material", "size", "function"):
            v = self.get(a)
            if v is not None:
                attrs[a] = v
        return Product(title=self.title, brand=self.brand, color=self.color, description=self.description,
                       attributes=attrs)


def type_relation(query_type: str, product_type: str) -> str:
    """Relation of a product type to the queried type: same / related / accessory / different."""
    if query_type not in CATALOGUE:
        raise ValueError(f"unknown query type {query_type!r}")
    if product_type == query_type:
        return "same"
    if product_type in RELATED[query_type]:
        return "related"
    if product_type in CATALOGUE[query_type].accessory_names:
        return "accessory"
    return "different"


def has_feature(function: str | None, feature: str) -> bool:
    """Whether a product whose function is ``function`` has the negatable ``feature``."""
    return function is not None and function in NEGATABLE[feature].has


def attribute_result(stated: str | None, actual: str | None) -> str:
    """``unspecified`` if the query states nothing, else ``match`` iff the product value equals it."""
    if stated is None:
        return "unspecified"
    return "match" if actual is not None and actual.lower() == stated.lower() else "mismatch"


def compute_facts(intent: Intent, item: Item) -> StepFacts:
    """The true step facts of (intent, item). A negated feature is met when the item lacks it."""
    results: dict[str, str] = {}
    for a in ATTRIBUTES:
        if a == "function" and intent.negated is not None:
            results[a] = "mismatch" if has_feature(item.function, intent.negated) else "match"
        else:
            results[a] = attribute_result(intent.constraints.get(a), item.get(a))
    relation = type_relation(intent.type, item.type)
    specs_met = relation == "same" and "mismatch" not in results.values()
    return StepFacts(
        type_relation=relation,
        specs_met="yes" if specs_met else "no",
        negation="yes" if intent.negated is not None else "no",
        query_class=intent.type,
        product_class=item.type,
        **results,
    )


# --------------------------------------------------------------------------------------------------
# Rendering products
# --------------------------------------------------------------------------------------------------


def _title_case(name: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in name.split())


def _after_type(function: str) -> bool:
    """Functions like "with Marble Top" / "Cabinet Only" read after the type noun."""
    return function.startswith("with ") or function.endswith(" Only")


def _plural(word_phrase: str) -> str:
    words = word_phrase.split()
    w = words[-1]
    if w.endswith(("s", "sh", "ch", "x", "z")):
        w += "es"
    elif w.endswith("y") and len(w) > 1 and w[-2] not in "aeiou":
        w = w[:-1] + "ies"
    else:
        w += "s"
    return " ".join(words[:-1] + [w])


def _lower(text: str) -> str:
    """Lower-case for running text, keeping acronym-like words (LED, Zero-VOC, Wi-Fi, GPM) intact."""
    return " ".join(w if sum(ch.isupper() for ch in w) >= 2 or w == "I" else w.lower() for w in text.split())


def _sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."


def _an(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def render_main(ptype: ProductType, values: Mapping[str, str | None], extra: str | None) -> tuple[str, str]:
    """Title and one-sentence description of a main-type product, Home Depot style:
    ``<Brand> <size> <material> <function> <extra> <Type> [with ...] [in <Colour>]``."""
    function = values.get("function")
    pre = [values.get("brand"), values.get("size"), values.get("material")]
    if function and not _after_type(function):
        pre.append(function)
    pre.append(extra)
    title = " ".join(p for p in pre if p) + " " + ptype.noun
    if function and _after_type(function):
        title += " " + function
    if values.get("color"):
        title += f" in {values['color']}"
    lead = _lower(ptype.noun)
    if function and not _after_type(function):
        lead = f"{_lower(function)} {lead}"
    elif function:
        lead = f"{lead} {_lower(function)}"
    desc = f"{_an(lead).capitalize()} {lead}"
    desc += f" from {values['brand']}" if values.get("brand") else ""
    bits = []
    if values.get("size"):
        bits.append(f"sized {values['size']}")
    if values.get("material"):
        bits.append(f"made of {_lower(values['material'])}")
    if values.get("color"):
        bits.append(f"finished in {_lower(values['color'])}")
    if bits:
        desc += ", " + ", ".join(bits)
    return title, _sentence(desc)


def render_accessory(name: str, parent: ProductType, brand: str, size: str | None, color: str | None,
                     for_parent: bool) -> tuple[str, str]:
    """Title and description of an accessory/part; the title always names the accessory."""
    title = " ".join(p for p in (brand, size, _title_case(name)) if p)
    if for_parent:
        title += f" for {_plural(parent.noun)}"
    if color:
        title += f" in {color}"
    desc = f"{_an(name).capitalize()} {name} for use with {_plural(parent.queries[0])}, from {brand}"
    if size:
        desc += f", {size}"
    if color:
        desc += f", finished in {_lower(color)}"
    return title, _sentence(desc)


# --------------------------------------------------------------------------------------------------
# Drawing intents and queries
# --------------------------------------------------------------------------------------------------


def _weighted(rng: random.Random, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys], k=1)[0]


def _stated_attributes(ptype: ProductType) -> list[str]:
    """Attributes a shopper can state for this type (those with a vocabulary)."""
    return [a for a in ATTRIBUTES if ptype.values(a)]


def draw_intent(rng: random.Random, kind: str) -> Intent:
    """Draw an intent of query kind ``kind`` (a base kind or ``negation``)."""
    if kind == "negation":
        key = rng.choice(list(NEGATION_TYPES))
        ptype = CATALOGUE[key]
        feature = rng.choice(NEGATION_TYPES[key])
        cons: dict[str, str] = {}
        if rng.random() < 0.3:
            cons["brand"] = rng.choice(ptype.brands)
        elif ptype.colors and rng.random() < 0.2:
            cons["color"] = rng.choice(ptype.colors)
        return Intent(key, cons, feature)
    key = rng.choice(list(CATALOGUE))
    ptype = CATALOGUE[key]
    if kind == "type_only":
        return Intent(key, {})
    if kind == "brand":
        return Intent(key, {"brand": rng.choice(ptype.brands)})
    avail = _stated_attributes(ptype)
    if kind == "attribute":
        a = rng.choice([x for x in avail if x != "brand"])
        return Intent(key, {a: rng.choice(ptype.values(a))})
    if kind == "multi_attribute":
        k = 2 if rng.random() < 0.7 or len(avail) < 3 else 3
        chosen = rng.sample(avail, k)
        return Intent(key, {a: rng.choice(ptype.values(a)) for a in ATTRIBUTES if a in chosen})
    raise ValueError(f"unknown query kind {kind!r}")


_UNIT_VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (" in.", (" in", " inch", '"')),
    (" ft.", (" ft", " foot", "'")),
    (" gal.", (" gal", " gallon")),
    (" oz.", (" oz", " ounce")),
    (" qt.", (" qt", " quart")),
)


def _size_surface(rng: random.Random, size: str) -> tuple[str, bool]:
    """Shoppers rarely type "1/2 in."; they type "1/2 inch" or "1/2 in"."""
    if rng.random() < 0.5:
        return size, False
    out, changed = size, False
    for unit, variants in _UNIT_VARIANTS:
        if unit in out:
            out = out.replace(unit, rng.choice(variants))
            changed = True
    return out, changed


def render_query(rng: random.Random, intent: Intent) -> tuple[str, list[str]]:
    """Render an intent as a shopper query; returns (text, list of surface variations applied)."""
    ptype = CATALOGUE[intent.type]
    variations: list[str] = []
    type_word = rng.choice(ptype.queries) if rng.random() < 0.4 else ptype.queries[0]
    if type_word != ptype.queries[0]:
        variations.append("synonym")
    if rng.random() < 0.15:
        type_word = _plural(type_word)
        variations.append("plural")
    c = intent.constraints
    before: list[str] = []
    after: list[str] = []
    mods: list[str] = []
    for a in ("size", "color", "material", "function"):
        if a not in c:
            continue
        v = c[a]
        if a == "size":
            v, changed = _size_surface(rng, v)
            if changed:
                variations.append("unit")
        if a == "function" and _after_type(v):
            after.append(v)
        else:
            mods.append(v)
    if len(mods) > 1 and rng.random() < 0.3:
        rng.shuffle(mods)
        variations.append("reordered")
    if mods and rng.random() < 0.2:
        after = mods + after
        mods = []
        variations.append("reordered")
    if "brand" in c:
        if rng.random() < 0.15:
            after.append(c["brand"])
            variations.append("reordered")
        else:
            before.append(c["brand"])
    before += mods
    core = type_word
    if intent.negated is not None:
        core = rng.choice(NEGATABLE[intent.negated].templates).format(t=type_word)
    text = " ".join(before + [core] + after)
    if rng.random() < 0.8:
        text = text.lower()
        variations.append("lower")
    return text, sorted(set(variations))


def add_typo(rng: random.Random, text: str) -> str:
    """Swap two adjacent letters or drop one letter in one word of 4+ letters; always changes text."""
    words = text.split()
    cands = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not cands:
        cands = [i for i, w in enumerate(words) if len(w) >= 3]
    if not cands:
        raise ValueError(f"cannot put a typo into {text!r}")
    for _ in range(20):
        i = rng.choice(cands)
        w = words[i]
        j = rng.randrange(1, len(w) - 1)  # keep the first letter: real typos rarely hit it
        if rng.random() < 0.5 and w[j] != w[j + 1]:
            new = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        else:
            new = w[:j] + w[j + 1:]
        if new != w:
            return " ".join(words[:i] + [new] + words[i + 1:])
    raise ValueError(f"cannot put a typo into {text!r}")  # pragma: no cover - needs a pathological word


def query_id_for(text: str) -> str:
    """Stable id for a query text (case/space-insensitive), so identical texts share one group."""
    return "syn-" + hashlib.sha1(normalize_query(text).encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Drawing candidate products
# --------------------------------------------------------------------------------------------------


def _main_item(rng: random.Random, key: str, fixed: Mapping[str, str]) -> Item:
    """A product of type ``key``; attributes in ``fixed`` are set, the rest drawn at random."""
    ptype = CATALOGUE[key]
    values: dict[str, str | None] = {}
    for a in ATTRIBUTES:
        vocab = ptype.values(a)
        values[a] = fixed[a] if a in fixed else (rng.choice(vocab) if vocab else None)
    extra = rng.choice(ptype.extras) if ptype.extras and rng.random() < 0.5 else None
    title, desc = render_main(ptype, values, extra)
    return Item(type=key, title=title, description=desc, **values)


def _functions_for(ptype: ProductType, feature: str, having: bool) -> list[str]:
    return [f for f in ptype.functions if has_feature(f, feature) == having]


def _exact(rng: random.Random, intent: Intent) -> Item:
    fixed = dict(intent.constraints)
    if intent.negated is not None:
        fixed["function"] = rng.choice(_functions_for(CATALOGUE[intent.type], intent.negated, False))
    return _main_item(rng, intent.type, fixed)


def _violable(intent: Intent) -> list[str]:
    """Stated attributes that a same-type product can fail (the type offers another value)."""
    ptype = CATALOGUE[intent.type]
    out = [a for a, v in intent.constraints.items() if any(x != v for x in ptype.values(a))]
    if intent.negated is not None:
        out.append("function")
    return [a for a in ATTRIBUTES if a in out]


def _same_mismatch(rng: random.Random, intent: Intent) -> Item:
    ptype = CATALOGUE[intent.type]
    violable = _violable(intent)
    k = 1 if len(violable) == 1 or rng.random() < 0.75 else 2
    broken = rng.sample(violable, k)  # a list: a set's order follows the per-process string hash, and the loop below
    # draws from rng in that order
    fixed = dict(intent.constraints)
    if intent.negated is not None:
        fixed["function"] = rng.choice(_functions_for(ptype, intent.negated, "function" in broken))
    for a in broken:
        if a == "function" and intent.negated is not None:
            continue
        fixed[a] = rng.choice([x for x in ptype.values(a) if x != intent.constraints[a]])
    return _main_item(rng, intent.type, fixed)


def _borrow(rng: random.Random, intent: Intent, key: str, p: float) -> dict[str, str]:
    """Stated values that type ``key`` also offers, each kept with probability ``p`` (shared brand or
    colour across types makes the type step the one that decides)."""
    ptype = CATALOGUE[key]
    return {a: v for a, v in intent.constraints.items() if v in ptype.values(a) and rng.random() < p}


def _related(rng: random.Random, intent: Intent) -> Item:
    key = rng.choice(RELATED[intent.type])
    return _main_item(rng, key, _borrow(rng, intent, key, 0.6))


def _different(rng: random.Random, intent: Intent) -> Item:
    others = [k for k in CATALOGUE if k != intent.type and k not in RELATED[intent.type]]
    key = rng.choice(others)
    return _main_item(rng, key, _borrow(rng, intent, key, 0.35))


def _accessory(rng: random.Random, intent: Intent) -> Item:
    parent = CATALOGUE[intent.type]
    name, sizes = rng.choice(parent.accessories)
    stated_brand = intent.constraints.get("brand")
    if stated_brand and rng.random() < 0.5:
        brand = stated_brand
    elif rng.random() < 0.6:
        brand = rng.choice(parent.brands)
    else:
        brand = rng.choice(_ACCESSORY_BRANDS[parent.category])
    size = rng.choice(sizes) if sizes else None
    color = None
    if parent.category in _FINISHED_ACCESSORIES and parent.colors and rng.random() < 0.5:
        stated = intent.constraints.get("color")
        color = stated if stated and rng.random() < 0.6 else rng.choice(parent.colors)
    title, desc = render_accessory(name, parent, brand, size, color, for_parent=rng.random() < 0.5)
    return Item(type=name, title=title, description=desc, brand=brand, color=color, size=size, parent=parent.key)


def draw_candidate(rng: random.Random, intent: Intent, kind: str) -> Item:
    """Draw a candidate of ``kind`` (exact / same_mismatch / related / accessory / different).

    A ``same_mismatch`` for a query that states nothing a same-type product could fail is impossible,
    so it falls back to a related type (still the same label under the guideline).
    """
    if kind == "exact":
        return _exact(rng, intent)
    if kind == "same_mismatch":
        return _same_mismatch(rng, intent) if _violable(intent) else _related(rng, intent)
    if kind == "related":
        return _related(rng, intent)
    if kind == "accessory":
        return _accessory(rng, intent)
    if kind == "different":
        return _different(rng, intent)
    raise ValueError(f"unknown candidate kind {kind!r}")


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_mix(label_mix: Mapping[str, float] | None, taxonomy: str) -> dict[str, float]:
    tax = get_taxonomy(taxonomy)
    if label_mix is None:
        return dict(DEFAULT_LABEL_MIX[taxonomy])
    out: dict[str, float] = {name: 0.0 for name in tax.labels}
    for label, w in label_mix.items():
        canonical = tax.normalize(label)
        if not isinstance(w, (int, float)) or w < 0:
            raise UserError(f"label_mix[{label!r}] must be a non-negative number, got {w!r}")
        out[canonical] = float(w)
    total = sum(out.values())
    if total <= 0:
        raise UserError("label_mix weights must not all be zero")
    return {k: v / total for k, v in out.items()}


def generate(
    n_queries: int = 1000,
    products_per_query: int = 8,
    seed: int = 0,
    taxonomy: str = "hd3",
    label_mix: Mapping[str, float] | None = None,
    label_noise: float = 0.0,
    typo_rate: float = 0.04,
    negation_rate: float = 0.08,
) -> list[Record]:
    """Generate ``n_queries * products_per_query`` labelled records with complete step facts.

    Deterministic for a seed: one ``random.Random(seed)`` drives everything except label noise, which
    has its own stream so that turning noise on changes labels only, never queries or products.

    ``label_mix`` maps labels of ``taxonomy`` to weights (default :data:`DEFAULT_LABEL_MIX`); each
    candidate slot draws its target label from it and then a candidate *kind* that yields that label.
    The stored label is still computed from the facts with the guideline rule, so it is exactly
    ``label_from_facts(facts)`` unless ``label_noise`` > 0, which replaces that share of labels by a
    different label chosen uniformly (simulated rater disagreement; the facts stay true).
    ``typo_rate`` and ``negation_rate`` are shares of queries (mutually exclusive).
    """
    if taxonomy not in _KINDS_FOR_LABEL:
        raise UserError(f"synthetic data supports taxonomies {list(_KINDS_FOR_LABEL)}, got {taxonomy!r}")
    if not isinstance(n_queries, int) or n_queries < 0:
        raise UserError(f"n_queries must be a non-negative integer, got {n_queries!r}")
    if not isinstance(products_per_query, int) or products_per_query < 1:
        raise UserError(f"products_per_query must be a positive integer, got {products_per_query!r}")
    for name, v in (("label_noise", label_noise), ("typo_rate", typo_rate), ("negation_rate", negation_rate)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{name} must be in [0, 1], got {v!r}")
    if typo_rate + negation_rate > 1.0:
        raise UserError(f"typo_rate + negation_rate must be <= 1, got {typo_rate + negation_rate}")
    mix = _check_mix(label_mix, taxonomy)
    kinds = _KINDS_FOR_LABEL[taxonomy]
    labels = get_taxonomy(taxonomy).labels

    rng = random.Random(seed)
    noise_rng = random.Random(f"she-synthetic-label-noise:{seed}")
    seen: set[str] = set()
    records: list[Record] = []
    for qi in range(n_queries):
        # The query kind is drawn once, so the configured rates hold exactly in expectation; the
        # intent is redrawn until its text is new. When a small space runs out (there are only so
        # many type-only texts) a repeated text is accepted: it shares the query_id, so its
        # candidates simply join that query's group.
        u = rng.random()
        if u < negation_rate:
            query_type = base = "negation"
        else:
            base = _weighted(rng, _BASE_QUERY_MIX)
            query_type = "typo" if u < negation_rate + typo_rate else base
        for _attempt in range(30):
            intent = draw_intent(rng, base)
            text, variations = render_query(rng, intent)
            if query_type == "typo":
                text = add_typo(rng, text)
            if normalize_query(text) not in seen:
                break
        seen.add(normalize_query(text))
        qid = query_id_for(text)
        meta = {
            "query_type": query_type,
            "base_query_type": base,
            "intended_type": intent.type,
            "constraints": json.dumps(dict(intent.constraints), sort_keys=True),
            "variation": ",".join(variations) or "none",
        }
        if intent.negated is not None:
            meta["negated_feature"] = intent.negated
        titles: set[str] = set()
        for pj in range(products_per_query):
            target = _weighted(rng, mix)
            kind = _weighted(rng, dict(kinds[target]))
            item = draw_candidate(rng, intent, kind)
            for _retry in range(10):  # avoid showing the same title twice for one query
                if item.title not in titles:
                    break
                item = draw_candidate(rng, intent, kind)
            titles.add(item.title)
            facts = compute_facts(intent, item)
            label = label_from_facts(facts, taxonomy)
            if label_noise > 0 and noise_rng.random() < label_noise:
                label = noise_rng.choice([x for x in labels if x != label])
            records.append(Record(
                id=f"syn{seed}-{qi:05d}-{pj:02d}",
                query=text,
                product=item.to_product(),
                label=label,
                taxonomy=taxonomy,
                query_id=qid,
                query_meta=dict(meta),
                facts=facts,
                source="synthetic",
            ))
    return records


def generate_to_jsonl(path: str | Path, **kwargs) -> int:
    """Write :func:`generate` output (same keyword arguments) as JSONL; returns the record count."""
    records = generate(**kwargs)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
    return len(records)
