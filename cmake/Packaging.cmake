# Installation rules and the Debian package (CPack DEB). Included at the end of the top-level
# CMakeLists.txt. `cmake --install build` installs under CMAKE_INSTALL_PREFIX (default
# /usr/local); `cmake --build build --target package` builds relay_<version>_<arch>.deb, which
# installs under /usr. What goes where, and what the maintainer scripts do: docs/packaging.md.
include(GNUInstallDirs)

# The daemon and CLI.
install(TARGETS relay RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

# The systemd template unit (one instance per site: relay@europe reads /etc/relay/europe.conf).
# It installs to <prefix>/lib/systemd/system; inside the .deb it is moved to /lib/systemd/system
# (the CPack pre-build script below), where Debian 12 packages ship units.
install(FILES ${PROJECT_SOURCE_DIR}/deploy/relay@.service DESTINATION lib/systemd/system)

# Example site configurations.
file(GLOB relay_example_configs CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/deploy/examples/*.conf)
install(FILES ${relay_example_configs} DESTINATION ${CMAKE_INSTALL_DOCDIR}/examples)
# Example drop-ins for the unit (removable media for bundle folders), copied by the admin into
# /etc/systemd/system/relay@.service.d/ (docs/deployment.md).
file(GLOB relay_example_dropins CONFIGURE_DEPENDS
     ${PROJECT_SOURCE_DIR}/deploy/relay@.service.d/*.conf.example)
install(FILES ${relay_example_dropins}
        DESTINATION ${CMAKE_INSTALL_DOCDIR}/examples/relay@.service.d)

# Documentation: README.md and docs/*.md.
file(GLOB relay_docs CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/docs/*.md)
install(FILES ${PROJECT_SOURCE_DIR}/README.md ${relay_docs} DESTINATION ${CMAKE_INSTALL_DOCDIR})

# The man page, gzipped at build time (reproducibly: gzip -n stores no name or time stamp).
set(relay_manpage_gz ${PROJECT_BINARY_DIR}/man/relay.8.gz)
add_custom_command(
  OUTPUT ${relay_manpage_gz}
  COMMAND ${CMAKE_COMMAND} -E copy ${PROJECT_SOURCE_DIR}/docs/relay.8 ${PROJECT_BINARY_DIR}/man/relay.8
  COMMAND gzip -9nf ${PROJECT_BINARY_DIR}/man/relay.8
  DEPENDS ${PROJECT_SOURCE_DIR}/docs/relay.8
  COMMENT "Compressing the man page relay.8"
  VERBATIM)
add_custom_target(relay_manpage ALL DEPENDS ${relay_manpage_gz})
install(FILES ${relay_manpage_gz} DESTINATION ${CMAKE_INSTALL_MANDIR}/man8)

# --- CPack: one Debian package, "relay" ---------------------------------------------------------
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME relay)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_VENDOR "relay team")
set(CPACK_PACKAGE_CONTACT "relay team <relay@example.invalid>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "federation and message-relay bridge for isolated chat sites")
set(CPACK_PACKAGE_DESCRIPTION [=[
One relay daemon runs per site. It takes chat messages in (Mattermost or an
HTTP ingest API), keeps them in a durable RocksDB queue, encrypts and signs
them for each peer site and ships them over ZeroMQ, a one-way UDP data diode
or sneakernet bundle files. The peer verifies, decrypts, de-duplicates and
delivers them exactly once, in order per channel.]=])
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)  # the RelWithDebInfo binary is ~130 MB with debug info
# Runs in the staging tree after the install, before the .deb is made: <prefix>/lib/systemd
# (here /usr/lib/systemd) becomes /lib/systemd.
file(WRITE ${PROJECT_BINARY_DIR}/CPackPreBuild.cmake [=[
set(root "${CPACK_TEMPORARY_DIRECTORY}")
set(prefix "${CPACK_PACKAGING_INSTALL_PREFIX}")
if(prefix AND NOT prefix STREQUAL "/" AND IS_DIRECTORY "${root}${prefix}/lib/systemd")
  file(MAKE_DIRECTORY "${root}/lib")
  file(RENAME "${root}${prefix}/lib/systemd" "${root}/lib/systemd")
  file(GLOB left "${root}${prefix}/lib/*")
  if(NOT left)
    file(REMOVE_RECURSE "${root}${prefix}/lib")
  endif()
endif()
]=])
set(CPACK_PRE_BUILD_SCRIPTS ${PROJECT_BINARY_DIR}/CPackPreBuild.cmake)

set(CPACK_DEBIAN_PACKAGE_NAME relay)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)  # relay_<version>_<arch>.deb
set(CPACK_DEBIAN_PACKAGE_MAINTAINER "relay team <relay@example.invalid>")
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_HOMEPAGE "https://example.invalid/relay")
# Depends: computed from the binary's shared libraries by dpkg-shlibdeps (package dpkg-dev).
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${PROJECT_SOURCE_DIR}/deploy/debian/postinst
    ${PROJECT_SOURCE_DIR}/deploy/debian/prerm
    ${PROJECT_SOURCE_DIR}/deploy/debian/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)  # maintainer scripts 0755

# `package_source` (not used by the Debian package): the source tree without builds.
set(CPACK_SOURCE_GENERATOR TGZ)
set(CPACK_SOURCE_IGNORE_FILES "/\\.git/" "/build[^/]*/" "__pycache__")

include(CPack)
