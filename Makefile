# cgtproxy: build and install. `make && make install` (as root), or for a
# package: `make install DESTDIR=/tmp/stage PREFIX=/usr`. README "Install"
# lists every path; `make uninstall` removes them again (not /etc/cgtproxy).
#
#   TARGET   the cargo target triple of the binary; default the static
#            x86_64-unknown-linux-musl build (`rustup target add` it first).
#            TARGET= (empty) installs the host's (glibc) build,
#            target/release/cgtproxy (cargo's CARGO_TARGET_DIR is honoured).
#   INIT     which service files: systemd (default), openrc, runit, or none.

PREFIX         ?= /usr
BINDIR         ?= $(PREFIX)/bin
DATADIR        ?= $(PREFIX)/share
MANDIR         ?= $(DATADIR)/man
SYSCONFDIR     ?= /etc
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
OPENRCDIR      ?= $(SYSCONFDIR)/init.d
OPENRCCONFDIR  ?= $(SYSCONFDIR)/conf.d
RUNITDIR       ?= $(SYSCONFDIR)/sv
INIT           ?= systemd
TARGET         ?= x86_64-unknown-linux-musl
CARGO          ?= cargo
CARGOFLAGS     ?= --locked
INSTALL        ?= install

# cargo's output directory (CARGO_TARGET_DIR when set).
CARGO_TARGET_DIR ?= target
ifeq ($(TARGET),)
BIN := $(CARGO_TARGET_DIR)/release/cgtproxy
TARGETFLAG :=
else
BIN := $(CARGO_TARGET_DIR)/$(TARGET)/release/cgtproxy
TARGETFLAG := --target $(TARGET)
endif

RULESETS := cgtproxy.nft cgtproxy-dns.nft cgtproxy-forward.nft
# Where the admin's `redefine` lines for each ruleset go (the rulesets
# include SETTINGSDIR/NAME.nft.d/*.nft); created empty, never filled.
SETTINGSDIRS := cgtproxy.nft.d cgtproxy-dns.nft.d cgtproxy-forward.nft.d

# The service files name the binary and the ruleset by their default paths;
# installed elsewhere, they name the installed ones.
SUBST = sed -e 's|/usr/bin/cgtproxy|$(BINDIR)/cgtproxy|g' \
	-e 's|/usr/share/cgtproxy/|$(DATADIR)/cgtproxy/|g'

.PHONY: all build install install-common install-systemd install-openrc \
	install-runit install-none uninstall deb clean

all: build

build:
	$(CARGO) build --release $(CARGOFLAGS) $(TARGETFLAG)

$(BIN):
	@echo "$(BIN) is missing: run \`make\` first (as your user, not root)" >&2
	@exit 1

install: install-common install-$(INIT)

install-common: $(BIN)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(DATADIR)/cgtproxy \
		$(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(SYSCONFDIR)/cgtproxy
	$(INSTALL) -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/cgtproxy
	for f in $(RULESETS); do \
		$(INSTALL) -m 0755 nft/$$f $(DESTDIR)$(DATADIR)/cgtproxy/$$f || exit 1; \
	done
	for d in $(SETTINGSDIRS); do \
		$(INSTALL) -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/cgtproxy/$$d || exit 1; \
	done
	$(INSTALL) -m 0644 man/cgtproxy.8 $(DESTDIR)$(MANDIR)/man8/cgtproxy.8
	$(INSTALL) -m 0644 man/cgtproxy.json.5 $(DESTDIR)$(MANDIR)/man5/cgtproxy.json.5
	# The rulesets are nft scripts (#!/usr/sbin/nft -f), so executable.
	# The example configuration is the built-in default; an existing one
	# (the admin's) is never replaced.
	[ -e $(DESTDIR)$(SYSCONFDIR)/cgtproxy/config.json ] || \
		$(INSTALL) -m 0644 init/config.json $(DESTDIR)$(SYSCONFDIR)/cgtproxy/config.json

install-systemd:
	$(INSTALL) -d $(DESTDIR)$(SYSTEMDUNITDIR)
	for u in cgtproxy.service cgtproxy-ruleset.service; do \
		$(SUBST) init/systemd/$$u > $(DESTDIR)$(SYSTEMDUNITDIR)/$$u && \
		chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/$$u || exit 1; \
	done

install-openrc:
	$(INSTALL) -d $(DESTDIR)$(OPENRCDIR) $(DESTDIR)$(OPENRCCONFDIR)
	$(SUBST) init/openrc/cgtproxy.initd > $(DESTDIR)$(OPENRCDIR)/cgtproxy
	chmod 0755 $(DESTDIR)$(OPENRCDIR)/cgtproxy
	[ -e $(DESTDIR)$(OPENRCCONFDIR)/cgtproxy ] || \
		$(INSTALL) -m 0644 init/openrc/cgtproxy.confd $(DESTDIR)$(OPENRCCONFDIR)/cgtproxy

install-runit:
	$(INSTALL) -d $(DESTDIR)$(RUNITDIR)/cgtproxy/log
	for f in run finish log/run; do \
		$(SUBST) init/runit/cgtproxy/$$f > $(DESTDIR)$(RUNITDIR)/cgtproxy/$$f && \
		chmod 0755 $(DESTDIR)$(RUNITDIR)/cgtproxy/$$f || exit 1; \
	done
	[ -e $(DESTDIR)$(RUNITDIR)/cgtproxy/conf ] || \
		$(SUBST) init/runit/cgtproxy/conf > $(DESTDIR)$(RUNITDIR)/cgtproxy/conf

install-none:

# Removes what `install` installed (for every INIT), and the directories it
# created when they are empty. /etc/cgtproxy/config.json, the OpenRC and
# runit settings and any file in the NAME.nft.d directories stay: they are
# the admin's.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/cgtproxy
	for f in $(RULESETS); do rm -f $(DESTDIR)$(DATADIR)/cgtproxy/$$f; done
	-rmdir $(DESTDIR)$(DATADIR)/cgtproxy
	rm -f $(DESTDIR)$(MANDIR)/man8/cgtproxy.8 $(DESTDIR)$(MANDIR)/man5/cgtproxy.json.5
	rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/cgtproxy.service \
		$(DESTDIR)$(SYSTEMDUNITDIR)/cgtproxy-ruleset.service
	rm -f $(DESTDIR)$(OPENRCDIR)/cgtproxy
	rm -f $(DESTDIR)$(RUNITDIR)/cgtproxy/run $(DESTDIR)$(RUNITDIR)/cgtproxy/finish \
		$(DESTDIR)$(RUNITDIR)/cgtproxy/log/run
	-rmdir $(DESTDIR)$(RUNITDIR)/cgtproxy/log
	-for d in $(SETTINGSDIRS); do rmdir $(DESTDIR)$(SYSCONFDIR)/cgtproxy/$$d; done

# The Debian package (debian/), from this same install step: ../cgtproxy_*.deb.
deb:
	dpkg-buildpackage -b -us -uc -d

clean:
	$(CARGO) clean
